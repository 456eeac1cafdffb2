"""The sample corpus: four domains of openly licensed text this machine can produce from what is
installed (Python's own docstrings via pydoc, Debian man pages, license texts from Debian and PyPI
packages) plus generated math problems, deliberately made dirty the way real drops are.

`python -m latentmas.jobs.corpus --out data/corpus` regenerates it deterministically (same installed
packages -> same bytes); the committed copy is what tests and the demo use. `upload_corpus` puts a
corpus folder into a raw bucket as `<domain>/<file>` keys, the layout the clean stage expects.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib
import io
import json
import math
import os
import pydoc
import random
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from latentmas.store import ObjectStore

SOURCES_FILE = "SOURCES.json"
TEXT_DOMAINS = ("python", "linux", "licenses")
DEMO_EXTENSION_FILES = 40  # extension files per text domain in the demo sample (see widen_demo_sample)
PYTHON_MODULES = [
    "json",
    "csv",
    "re",
    "pathlib",
    "itertools",
    "functools",
    "collections",
    "argparse",
    "logging",
    "datetime",
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "random",
    "statistics",
    "shutil",
    "tempfile",
    "hashlib",
    "base64",
    "sqlite3",
    "contextlib",
    "dataclasses",
    "enum",
    "io",
    "glob",
    "fnmatch",
    "difflib",
    "copy",
    "pprint",
    "queue",
    "sched",
    "zipfile",
    "tarfile",
    "gzip",
    "urllib.parse",
    "html",
    "uuid",
    "decimal",
    "fractions",
    "math",
    "operator",
    "abc",
    "secrets",
    "struct",
    "calendar",
    "shlex",
    "configparser",
]
MAN_PAGES = [
    "ls",
    "grep",
    "tar",
    "ssh",
    "find",
    "sed",
    "mawk",
    "curl",
    "ps",
    "chmod",
    "cp",
    "mv",
    "rm",
    "tee",
    "sort",
    "uniq",
    "cut",
    "tr",
    "xargs",
    "kill",
    "df",
    "du",
    "mount",
    "ip",
    "systemctl",
    "gzip",
    "make",
    "diff",
    "patch",
    "less",
    "head",
    "tail",
    "wc",
    "date",
    "env",
    "ln",
    "mkdir",
    "touch",
    "cat",
    "chown",
    "stat",
]
# The extension (`generate_extension`): more of each kind, not in the demo's sample (see `upload_corpus`).
MORE_PYTHON_MODULES = [
    "array", "ast", "asyncio", "atexit", "binascii", "bz2", "cmath", "cmd", "code", "codecs", "colorsys",
    "compileall", "concurrent.futures", "contextvars", "copyreg", "ctypes", "dbm", "dis", "doctest", "email",
    "email.message", "errno", "faulthandler", "filecmp", "fileinput", "ftplib", "gc", "getopt", "getpass", "gettext",
    "graphlib", "hmac", "http.client", "http.server", "imaplib", "importlib", "inspect", "ipaddress", "keyword",
    "linecache", "locale", "lzma", "mailbox", "marshal", "mimetypes", "mmap", "multiprocessing", "netrc", "numbers",
    "optparse", "os", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "profile", "pstats",
    "pty", "py_compile", "pyclbr", "quopri", "reprlib", "resource", "runpy", "select", "selectors", "shelve",
    "signal", "site", "smtplib", "socket", "socketserver", "ssl", "stat", "stringprep", "subprocess", "symtable",
    "sys", "sysconfig", "tabnanny", "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace",
    "traceback", "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock", "urllib.request",
    "warnings", "wave", "weakref", "webbrowser", "wsgiref", "xml.dom.minidom", "xml.etree.ElementTree",
    "xmlrpc.client", "zipapp", "zipimport", "zlib", "zoneinfo",
]  # fmt: skip
MORE_MAN_PAGES = [
    "base32", "basename", "bc", "bzip2", "chgrp", "cksum", "cmp", "column", "comm", "csplit", "dd", "diff3",
    "dirname", "dmesg", "echo", "expand", "expr", "factor", "fallocate", "file", "flock", "fmt", "fold", "free",
    "fuser", "getent", "git", "groups", "gpg", "hostname", "id", "install", "join", "journalctl", "last", "lsblk",
    "lsof", "md5sum", "mktemp", "more", "nice", "nl", "nohup", "nproc", "numfmt", "od", "paste", "pgrep", "pkill",
    "printenv", "printf", "pwd", "readlink", "realpath", "renice", "rev", "rmdir", "runuser", "script", "seq",
    "setsid", "sha256sum", "shred", "shuf", "sleep", "split", "ss", "stdbuf", "strace", "strings", "stty", "su",
    "sum", "sync", "tac", "taskset", "test", "timeout", "top", "tput", "truncate", "tsort", "tty", "uname",
    "unexpand", "unzip", "uptime", "useradd", "usermod", "w", "watch", "wget", "whereis", "which", "who", "whoami",
    "yes", "zip", "lsattr", "chattr", "findmnt", "mknod", "mkfifo", "ldd", "nm", "objdump", "strip", "ssh-keygen",
    "scp", "sftp", "openssl", "tmux", "jq", "sqlite3", "perl", "dash",
]  # fmt: skip
DEBIAN_DOCS = Path("/usr/share/doc")
MORE_COPYRIGHT_FILES = 160  # Debian copyright files (each names its package's licenses), every k-th by package
PLAINTEXT: Any = vars(pydoc)["plaintext"]  # pydoc's renderer without overstrike bold; not in typeshed
# The project's own dependency tree (pinned by constraints.txt), so the corpus does not change when
# someone installs an unrelated package.
LICENSE_PACKAGES = frozenset(
    [
        "accelerate",
        "aiohttp",
        "aiosignal",
        "annotated_types",
        "anyio",
        "attrs",
        "bm25s",
        "certifi",
        "charset_normalizer",
        "click",
        "datasets",
        "dill",
        "durationpy",
        "faiss_cpu",
        "fastapi",
        "filelock",
        "frozenlist",
        "fsspec",
        "h11",
        "httpcore",
        "httpx",
        "huggingface_hub",
        "idna",
        "iniconfig",
        "jinja2",
        "joblib",
        "jsonpatch",
        "jsonpointer",
        "kopf",
        "kubernetes",
        "markdown_it_py",
        "markupsafe",
        "mdurl",
        "minio",
        "mpmath",
        "multidict",
        "multiprocess",
        "networkx",
        "numpy",
        "oauthlib",
        "packaging",
        "peft",
        "pluggy",
        "polars",
        "prometheus_client",
        "psutil",
        "py4j",
        "pyarrow",
        "pydantic",
        "pydantic_core",
        "pygments",
        "pyspark",
        "pytest",
        "python_dateutil",
        "pyyaml",
        "regex",
        "requests",
        "rich",
        "safetensors",
        "scikit_learn",
        "scipy",
        "sentence_transformers",
        "six",
        "sniffio",
        "starlette",
        "sympy",
        "threadpoolctl",
        "tokenizers",
        "torch",
        "tqdm",
        "transformers",
        "trl",
        "typing_extensions",
        "urllib3",
        "uvicorn",
        "xxhash",
        "yarl",
    ]
)
COMMON_LICENSES = Path("/usr/share/common-licenses")
BOILERPLATE = (
    "Copyright (c) 2024 Example Docs Team. All rights reserved.",
    "Subscribe to our newsletter for weekly updates!",
    "Home | About | Contact | Privacy Policy",
    "This page was generated automatically. Do not edit.",
)
CONTACTS = (
    "Questions? Write to maintainer.{n}@example.com or call +1 555-013-{n:04d}.",
    "Mirror hosted at 192.0.2.{m}; report abuse to abuse-{n}@example.org.",
    "Contact the on-call engineer at (555) 201-{n:04d} or ops{n}@example.net.",
)


@dataclass(frozen=True)
class Source:
    """Provenance of one generated file."""

    path: str
    domain: str
    origin: str
    license: str
    format: str
    note: str = ""
    demo: bool = True  # in the demo's bounded sample (SOURCES.json entries without it are)
    extension: bool = False  # written by generate_extension (entries without it are not)


class CorpusWriter:
    def __init__(self, root: Path, seed: int, demo: bool = True) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.sources: list[Source] = []
        self.demo = demo

    def write(self, rel: str, data: bytes | str, origin: str, license: str, note: str = "") -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        fmt = rel.rsplit(".", 1)[-1]
        self.sources.append(Source(rel, rel.split("/")[0], origin, license, fmt, note, self.demo, not self.demo))

    def dirty(self, text: str) -> str:
        """Adds boilerplate lines and, sometimes, contact details (PII to redact)."""
        n = self.rng.randrange(10000)
        lines = [self.rng.choice(BOILERPLATE), text.rstrip(), ""]
        if self.rng.random() < 0.35:
            lines.append(self.rng.choice(CONTACTS).format(n=n, m=n % 250 + 1))
        lines.append(self.rng.choice(BOILERPLATE))
        return "\n".join(lines) + "\n"


def _sanitize(text: str) -> str:
    """Removes what differs between runs or machines (addresses, install paths)."""
    text = re.sub(r"0x[0-9a-fA-F]{6,}", "0x0", text)
    text = re.sub(r"/[\w./-]*python3\.\d+[\w./-]*", "<stdlib>", text)
    return "\n".join(line for line in text.splitlines() if not line.startswith(("FILE", "MODULE REFERENCE")))


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


def python_docs(writer: CorpusWriter, modules: list[str] = PYTHON_MODULES) -> None:
    license = "PSF-2.0 (CPython standard library docstrings)"
    for i, name in enumerate(modules):
        module = importlib.import_module(name)
        origin = f"pydoc of Python {sys.version_info.major}.{sys.version_info.minor} module {name}"
        slug = name.replace(".", "_")
        if i % 5 == 3:
            body = _sanitize(pydoc.HTMLDoc().docmodule(module))
            page = f"<html><head><title>{name}</title><script>track()</script></head><body>"
            page += (
                f"<nav>Home | Modules | Search</nav>{_cap(body, 24000)}<footer>{BOILERPLATE[0]}</footer></body></html>"
            )
            writer.write(f"python/{slug}.html", page, origin, license)
        elif i % 5 == 1:
            text = _cap(_sanitize(pydoc.render_doc(module, renderer=PLAINTEXT)), 16000)
            writer.write(f"python/{slug}.md", f"# Module `{name}`\n\n```\n{text}\n```\n", origin, license)
        else:
            text = _cap(_sanitize(pydoc.render_doc(module, renderer=PLAINTEXT)), 16000)
            writer.write(f"python/{slug}.txt", writer.dirty(text), origin, license)


def _package_license(page: Path) -> tuple[str, str]:
    owner = subprocess.run(["dpkg", "-S", str(page)], capture_output=True, text=True, check=False).stdout
    package = owner.split(":")[0].strip() or "unknown"
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    found = (
        re.search(r"^License:\s*(.+)$", copyright_file.read_text(errors="replace"), re.M)
        if copyright_file.is_file()
        else None
    )
    return package, found.group(1).strip() if found else "see /usr/share/doc/<package>/copyright"


def _man_html(name: str, text: str) -> str:
    """A man page as a web page (section titles as headings, paragraphs), wrapped in site chrome."""
    body = []
    for block in re.split(r"\n\s*\n", text):
        stripped = block.strip()
        if re.fullmatch(r"[A-Z][A-Z ]+", stripped):
            body.append(f"<h2>{html.escape(stripped)}</h2>")
        elif stripped:
            body.append(f"<p>{html.escape(' '.join(stripped.split()))}</p>")
    return (
        f"<!DOCTYPE html><html><head><title>{name}(1)</title><style>p {{margin: 0}}</style></head><body>"
        f"<header><nav>Home | Manuals | Search</nav></header><h1>{name}</h1>{''.join(body)}"
        f"<footer>{BOILERPLATE[0]}</footer><script>analytics()</script></body></html>\n"
    )


def linux_man_pages(writer: CorpusWriter, pages: list[str] = MAN_PAGES) -> None:
    env = {**os.environ, "MANWIDTH": "80", "LANG": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    for i, name in enumerate(pages):
        located = subprocess.run(["man", "-w", name], capture_output=True, text=True, env=env, check=False)
        if located.returncode != 0:
            print(f"corpus: man page {name} not installed, skipped", file=sys.stderr)
            continue
        page = Path(located.stdout.strip())
        package, license = _package_license(page)
        origin = f"man page {page.name} from Debian package {package}"
        text = subprocess.run(
            ["man", "--nh", "--nj", "-P", "cat", name], capture_output=True, text=True, env=env, check=True
        ).stdout
        if i % 6 == 2:
            writer.write(f"linux/{name}.html", _man_html(name, _cap(text, 30000)), origin, license)
            continue
        writer.write(f"linux/{name}.txt", writer.dirty(_cap(text, 30000)), origin, license)


def license_texts(writer: CorpusWriter, site_packages: Path) -> None:
    for path in sorted(COMMON_LICENSES.iterdir()):
        if path.is_file():
            text = path.read_text(errors="replace")
            writer.write(
                f"licenses/debian-{path.name}.txt", _cap(text, 40000), f"Debian {path}", "verbatim copying permitted"
            )
    for info in sorted(site_packages.glob("*.dist-info")):
        if info.name.split("-")[0].lower() not in LICENSE_PACKAGES:
            continue
        files = sorted(p for p in info.rglob("*") if p.is_file() and re.match(r"(LICEN[CS]E|COPYING)", p.name, re.I))
        if files:
            package = info.name.removesuffix(".dist-info")
            text = files[0].read_text(errors="replace")
            writer.write(
                f"licenses/pypi-{package}.md",
                f"## License of {package}\n\n{_cap(text, 20000)}\n",
                f"PyPI {package} ({files[0].name})",
                "the license text itself",
            )


def _linear(rng: random.Random) -> tuple[str, str, str]:
    a, x, b = rng.randint(2, 12), rng.randint(-15, 15), rng.randint(-40, 40)
    c = a * x + b
    problem = f"Solve the linear equation {a}x + {b} = {c} for x."
    steps = (
        f"We isolate the unknown. Subtract {b} from both sides to get {a}x = {c} - ({b}) = {c - b}. "
        f"Then divide both sides by the coefficient {a}: x = {c - b} / {a} = {x}. "
        f"Check: {a} * {x} + {b} = {a * x + b}, which equals the right-hand side {c}, so the solution is correct."
    )
    return "Linear equation", problem, f"{steps} Answer: x = {x}."


def _quadratic(rng: random.Random) -> tuple[str, str, str]:
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2
    problem = f"Find all real roots of the quadratic x^2 + ({b})x + ({c}) = 0."
    disc = b * b - 4 * c
    steps = (
        f"The discriminant is b^2 - 4ac = ({b})^2 - 4*1*({c}) = {disc}. Since it is non-negative the roots are real. "
        f"By the quadratic formula x = (-b ± sqrt(D)) / 2 = ({-b} ± {int(disc**0.5)}) / 2. "
        f"This gives x = {max(r1, r2)} and x = {min(r1, r2)}. "
        f"Factoring confirms (x - {r1})(x - {r2}) expands to the original polynomial."
    )
    return "Quadratic equation", problem, f"{steps} Answer: x = {min(r1, r2)}, {max(r1, r2)}."


def _derivative(rng: random.Random) -> tuple[str, str, str]:
    coeffs = [rng.randint(-6, 6) or 1 for _ in range(4)]
    terms = " + ".join(f"{c}x^{3 - i}" for i, c in enumerate(coeffs[:3])) + f" + {coeffs[3]}"
    point = rng.randint(-3, 3)
    d = [3 * coeffs[0], 2 * coeffs[1], coeffs[2]]
    value = d[0] * point**2 + d[1] * point + d[2]
    problem = f"Differentiate f(x) = {terms} and evaluate the derivative at x = {point}."
    steps = (
        f"Apply the power rule d/dx x^n = n x^(n-1) term by term; the constant {coeffs[3]} has derivative zero. "
        f"So f'(x) = {d[0]}x^2 + {d[1]}x + {d[2]}. Substituting x = {point}: "
        f"{d[0]}*({point})^2 + {d[1]}*({point}) + {d[2]} = {value}. The slope of the tangent line there is {value}."
    )
    return "Derivative of a polynomial", problem, f"{steps} Answer: f'({point}) = {value}."


def _series(rng: random.Random) -> tuple[str, str, str]:
    a, d, n = rng.randint(1, 20), rng.randint(1, 9), rng.randint(5, 40)
    last = a + (n - 1) * d
    total = n * (a + last) // 2
    problem = f"Compute the sum of the arithmetic sequence with first term {a}, common difference {d} and {n} terms."
    steps = (
        f"The last term is a + (n - 1)d = {a} + {n - 1}*{d} = {last}. The sum of an arithmetic series is n(a + l)/2, "
        f"the number of terms times the average of the first and last term: {n} * ({a} + {last}) / 2 = {total}. "
        f"Pairing terms from both ends, each pair sums to {a + last}, which is why the formula works."
    )
    return "Arithmetic series", problem, f"{steps} Answer: {total}."


def _probability(rng: random.Random) -> tuple[str, str, str]:
    target = rng.randint(3, 11)
    ways = sum(1 for i in range(1, 7) for j in range(1, 7) if i + j == target)
    prob = Fraction(ways, 36)
    problem = f"Two fair six-sided dice are rolled. What is the probability that the sum equals {target}?"
    steps = (
        f"There are 6 * 6 = 36 equally likely ordered outcomes. Count the pairs (i, j) with i + j = {target}: "
        f"there are {ways} such pairs. The probability is favourable over total outcomes, {ways}/36, "
        f"which reduces to {prob.numerator}/{prob.denominator} (about {float(prob):.4f})."
    )
    return "Dice probability", problem, f"{steps} Answer: {prob.numerator}/{prob.denominator}."


def _gcd(rng: random.Random) -> tuple[str, str, str]:
    g = rng.randint(2, 30)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    x, y, trace = a, b, []
    while y:
        trace.append(f"{x} = {x // y}*{y} + {x % y}")
        x, y = y, x % y
    lcm = a * b // x
    problem = f"Find the greatest common divisor and least common multiple of {a} and {b}."
    steps = (
        f"Use the Euclidean algorithm, replacing the larger number by the remainder: {'; '.join(trace)}. "
        f"The last non-zero remainder is the gcd, {x}. The least common multiple follows from gcd * lcm = a * b: "
        f"lcm = {a} * {b} / {x} = {lcm}."
    )
    return "GCD and LCM", problem, f"{steps} Answer: gcd = {x}, lcm = {lcm}."


MATH_KINDS = (_linear, _quadratic, _derivative, _series, _probability, _gcd)


def math_problems(writer: CorpusWriter, count: int) -> None:
    rng = random.Random(7)
    origin, license = "generated by latentmas.jobs.corpus (seeded)", "CC0-1.0"
    problems = []
    for i in range(count):
        title, problem, solution = MATH_KINDS[i % len(MATH_KINDS)](rng)
        problems.append({"id": f"math-{i:05d}", "title": title, "text": f"Problem: {problem}\n\nSolution: {solution}"})
    for part in range(3):
        rows = problems[part::4]
        lines = [json.dumps(p, ensure_ascii=False) for p in rows]
        if part == 1:
            lines.insert(5, '{"id": "math-broken", "text": "Problem: unterminated')
        writer.write(f"math/problems-{part}.jsonl", "\n".join(lines) + "\n", origin, license)
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=["id", "title", "text"], lineterminator="\n")
    table.writeheader()
    table.writerows(problems[3::4])
    writer.write("math/problems.csv", buffer.getvalue(), origin, license)
    notes = "\n\n".join(f"## {p['title']} ({p['id']})\n\n{p['text']}" for p in problems[:40])
    writer.write("math/worked-examples.md", writer.dirty(f"# Worked examples\n\n{notes}"), origin, license)


def _percent(rng: random.Random) -> tuple[str, str, str]:
    old, change = rng.randint(20, 400), rng.choice([-40, -25, -20, -10, 5, 10, 15, 20, 25, 50, 75])
    new = old * (100 + change) / 100
    problem = f"A price goes from {old} to {new:g}. By what percentage did it change?"
    steps = (
        f"The change is new minus old: {new:g} - {old} = {new - old:g}. Divide by the original value and "
        f"multiply by 100: {new - old:g} / {old} * 100 = {change}%. A negative result is a decrease."
    )
    return "Percentage change", problem, f"{steps} Answer: {change:+d}%."


def _compound(rng: random.Random) -> tuple[str, str, str]:
    principal, rate, years = rng.choice([500, 1000, 2000, 5000]), rng.choice([2, 3, 4, 5, 6, 8]), rng.randint(2, 10)
    amount = principal * (1 + rate / 100) ** years
    problem = f"{principal} is invested at {rate}% interest compounded yearly. What is it worth after {years} years?"
    steps = (
        f"Each year multiplies the balance by 1 + {rate}/100 = {1 + rate / 100:g}. After {years} years the factor is "
        f"{1 + rate / 100:g}^{years} = {(1 + rate / 100) ** years:.4f}, so the amount is {principal} * "
        f"{(1 + rate / 100) ** years:.4f} = {amount:.2f}. The interest earned is {amount - principal:.2f}."
    )
    return "Compound interest", problem, f"{steps} Answer: {amount:.2f}."


def _system(rng: random.Random) -> tuple[str, str, str]:
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    a, b, c, d = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6), -rng.randint(1, 6)
    e, f = a * x + b * y, c * x + d * y
    det = a * d - b * c
    problem = f"Solve the system {a}x + {b}y = {e} and {c}x + ({d})y = {f}."
    steps = (
        f"Use elimination or Cramer's rule. The determinant is {a}*({d}) - {b}*{c} = {det}, which is not zero, so "
        f"there is exactly one solution. x = ({e}*({d}) - {b}*{f}) / {det} = {x} and "
        f"y = ({a}*{f} - {e}*{c}) / {det} = {y}. Substituting back satisfies both equations."
    )
    return "System of linear equations", problem, f"{steps} Answer: x = {x}, y = {y}."


def _combinations(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(5, 14)
    k = rng.randint(2, n - 2)
    ways = math.comb(n, k)
    problem = f"In how many ways can a committee of {k} be chosen from {n} people?"
    steps = (
        f"Order does not matter, so count combinations: C(n, k) = n! / (k! (n - k)!). "
        f"C({n}, {k}) = {n}! / ({k}! * {n - k}!) = {ways}. Choosing the {n - k} people left out gives the same count."
    )
    return "Combinations", problem, f"{steps} Answer: {ways}."


def _modpow(rng: random.Random) -> tuple[str, str, str]:
    base, exponent, modulus = rng.randint(2, 12), rng.randint(5, 40), rng.choice([7, 11, 13, 17, 19, 23])
    value = pow(base, exponent, modulus)
    problem = f"What is the remainder when {base}^{exponent} is divided by {modulus}?"
    steps = (
        f"Work modulo {modulus} and square repeatedly instead of computing {base}^{exponent} in full. "
        f"Write {exponent} in binary ({exponent:b}), multiply the squares whose bits are set, reducing mod {modulus} "
        f"after each step. By Fermat's little theorem exponents can also be reduced mod {modulus - 1}."
    )
    return "Modular exponentiation", problem, f"{steps} Answer: {value}."


def _pythagoras(rng: random.Random) -> tuple[str, str, str]:
    m, n = rng.randint(2, 7), rng.randint(1, 6)
    m, n = max(m, n + 1), min(m - 1, n)
    a, b, c = m * m - n * n, 2 * m * n, m * m + n * n
    problem = f"A right triangle has legs {a} and {b}. How long is the hypotenuse?"
    steps = (
        f"By the Pythagorean theorem c^2 = a^2 + b^2 = {a * a} + {b * b} = {c * c}. Taking the square root, "
        f"c = {c}. The area is half the product of the legs, {a * b // 2}."
    )
    return "Right triangle", problem, f"{steps} Answer: {c}."


def _mean_median(rng: random.Random) -> tuple[str, str, str]:
    values = sorted(rng.randint(1, 60) for _ in range(rng.choice([5, 6, 7])))
    shown = list(values)
    rng.shuffle(shown)
    mean = Fraction(sum(values), len(values))
    mid = len(values) // 2
    median = Fraction(values[mid]) if len(values) % 2 else Fraction(values[mid - 1] + values[mid], 2)
    problem = f"Find the mean and the median of {', '.join(map(str, shown))}."
    steps = (
        f"The mean is the sum divided by the count: {sum(values)} / {len(values)} = {float(mean):.3f}. "
        f"For the median sort the values ({', '.join(map(str, values))}) and take the middle one "
        f"(the average of the two middle ones for an even count): {float(median):g}."
    )
    return "Mean and median", problem, f"{steps} Answer: mean {float(mean):.3f}, median {float(median):g}."


def _speed(rng: random.Random) -> tuple[str, str, str]:
    distance, minutes = rng.randint(5, 300), rng.choice([15, 20, 30, 40, 45, 50, 90, 120, 150])
    kmh = distance / (minutes / 60)
    problem = f"A train covers {distance} km in {minutes} minutes. What is its average speed in km/h and in m/s?"
    steps = (
        f"Convert the time to hours: {minutes} / 60 = {minutes / 60:g} h. Speed is distance over time: "
        f"{distance} / {minutes / 60:g} = {kmh:.2f} km/h. One km/h is 1000 m / 3600 s, so divide by 3.6: "
        f"{kmh / 3.6:.2f} m/s."
    )
    return "Average speed", problem, f"{steps} Answer: {kmh:.2f} km/h = {kmh / 3.6:.2f} m/s."


MORE_MATH_KINDS = (_percent, _compound, _system, _combinations, _modpow, _pythagoras, _mean_median, _speed)


def more_math(writer: CorpusWriter, count: int) -> None:
    """Problems of eight more kinds (one JSONL file; the first 900 problems are left as they are)."""
    rng = random.Random(8)
    rows = []
    for i in range(count):
        title, problem, solution = MORE_MATH_KINDS[i % len(MORE_MATH_KINDS)](rng)
        text = f"Problem: {problem}\n\nSolution: {solution}"
        rows.append(json.dumps({"id": f"math-more-{i:05d}", "title": title, "text": text}, ensure_ascii=False))
    writer.write("math/problems-more.jsonl", "\n".join(rows) + "\n", "generated by latentmas.jobs.corpus", "CC0-1.0")


def debian_copyrights(writer: CorpusWriter, count: int = MORE_COPYRIGHT_FILES) -> None:
    """Copyright files of installed Debian packages (distinct texts of 1.5-40 kB, every k-th by package)."""
    files, seen = [], set()
    for path in sorted(DEBIAN_DOCS.glob("*/copyright")):
        text = path.read_text(errors="replace") if path.is_file() else ""
        if 1500 <= len(text) <= 40000 and text not in seen:
            seen.add(text)
            files.append((path.parent.name, text))
    step = max(1, len(files) // count)
    for package, text in files[::step][:count]:
        writer.write(
            f"licenses/debian-copyright-{package}.txt",
            text,
            f"Debian {DEBIAN_DOCS}/{package}/copyright",
            "the package's copyright notice and license texts (verbatim copying permitted)",
        )


def generate_extension(out: Path) -> list[Source]:
    """The extension: more pydoc modules and man pages, Debian copyright files, more math and the documents
    written for this project (`data/corpus-written/`). Not in the demo's sample."""
    writer = CorpusWriter(out, seed=43, demo=False)
    python_docs(writer, MORE_PYTHON_MODULES)
    linux_man_pages(writer, MORE_MAN_PAGES)
    debian_copyrights(writer)
    more_math(writer, 320)
    project_documents(writer)
    return writer.sources


def project_documents(writer: CorpusWriter) -> None:
    """Copies the documents written for this project (`written_dir()`, wherever the corpus goes)."""
    written = written_dir()
    for path in sorted(written.rglob("*.txt")):
        rel = path.relative_to(written).as_posix()
        writer.write(rel, path.read_bytes(), "written for this project (2026-11-30)", "CC0-1.0", "project-written")


def dirty_extras(writer: CorpusWriter) -> None:
    """Exact and near duplicates, wrong encodings, empty, garbage and malformed files."""
    note = "derived test case"
    for rel in ("python/json.txt", "linux/ls.txt", "licenses/debian-Apache-2.0.txt"):
        original = (writer.root / rel).read_bytes()
        stem, ext = rel.rsplit(".", 1)
        writer.write(f"{stem}-copy.{ext}", original, f"exact copy of {rel}", "as original", note)
        words = original.decode("utf-8", errors="replace").split(" ")
        for k in range(0, len(words), 97):
            words[k] = words[k].upper()
        writer.write(
            f"{stem}-edited.{ext}", " ".join(words) + "\nEdited mirror.\n", f"near copy of {rel}", "as original", note
        )
    latin = (
        "Café notes — naïve résumé handling in Python\u2019s codecs module. "
        "Encoding errors happen when bytes written as cp1252 are read as UTF-8; the cleaner repairs them. " * 4
    )
    writer.write(
        "python/codecs-notes-cp1252.txt", latin.encode("cp1252"), "written for the corpus", "CC0-1.0", "cp1252 bytes"
    )
    writer.write("linux/empty.txt", b"", "written for the corpus", "CC0-1.0", "empty file")
    writer.write("math/blank.md", b"   \n\n\t\n", "written for the corpus", "CC0-1.0", "whitespace only")
    writer.write("linux/core-dump.txt", random.Random(3).randbytes(3000), "random bytes", "CC0-1.0", "undecodable")
    writer.write(
        "linux/ascii-art.txt", ("#=+*" * 20 + "\n") * 12 + "logo\n", "written for the corpus", "CC0-1.0", "symbols"
    )
    writer.write("math/short.txt", "2 + 2 = 4.\n", "written for the corpus", "CC0-1.0", "too short")
    writer.write("math/scores.csv", "id,score\n1,0.5\n2,0.7\n", "written for the corpus", "CC0-1.0", "no text column")
    writer.write("licenses/index.json", "{not json", "written for the corpus", "CC0-1.0", "unsupported extension")


def generate(out: Path, site_packages: Path, math_count: int = 900, seed: int = 42) -> list[Source]:
    """Writes the whole corpus under `out` (which is emptied first) and its SOURCES.json."""
    if out.exists():
        for path in sorted(out.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    out.mkdir(parents=True, exist_ok=True)
    writer = CorpusWriter(out, seed)
    for step, build in enumerate(
        (
            lambda: python_docs(writer),
            lambda: linux_man_pages(writer),
            lambda: license_texts(writer, site_packages),
            lambda: math_problems(writer, math_count),
            lambda: dirty_extras(writer),
        ),
        1,
    ):
        build()
        print(f"corpus: step {step}/5, {len(writer.sources)} files", file=sys.stderr)
    return write_sources(out, widen_demo_sample(out, writer.sources + generate_extension(out)))


def widen_demo_sample(out: Path, sources: Iterable[Source], per_domain: int = DEMO_EXTENSION_FILES) -> list[Source]:
    """`sources` with the demo sample widened, per text domain, by the extension's project-written documents and
    its `per_domain` smallest files: enough documents that the demo stack's held-out split carries a bootstrap
    interval (core/demo-stack.yaml, >= 15 per text domain) at the fewest added chunks (the index embeds them all).
    Files are picked by size and name alone, never by their split."""
    listed = list(sources)
    chosen = {s.path for s in listed if s.extension and s.note == "project-written"}
    for domain in TEXT_DOMAINS:
        extension = [s for s in listed if s.domain == domain and s.extension and s.path not in chosen]
        extension.sort(key=lambda s: ((out / s.path).stat().st_size, s.path))
        chosen |= {s.path for s in extension[:per_domain]}
    return [replace(s, demo=s.path in chosen) if s.extension else s for s in listed]


def write_sources(out: Path, sources: Iterable[Source]) -> list[Source]:
    ordered = sorted(sources, key=lambda s: s.path)
    (out / SOURCES_FILE).write_text(json.dumps([asdict(s) for s in ordered], indent=1) + "\n")
    return ordered


def read_sources(folder: Path) -> list[Source]:
    """SOURCES.json of a corpus folder (entries from before the `demo` flag are in the demo sample)."""
    return [Source(**row) for row in json.loads((folder / SOURCES_FILE).read_text())]


def regenerate_extension(out: Path) -> list[Source]:
    """Rewrites only the extension (the files `generate_extension` writes, those widening put into the demo sample
    included), leaving the rest of the demo sample's bytes as they are."""
    kept = []
    for source in read_sources(out):
        if source.extension:
            (out / source.path).unlink(missing_ok=True)
        else:
            kept.append(source)
    return write_sources(out, widen_demo_sample(out, kept + generate_extension(out)))


def corpus_files(folder: Path) -> Iterable[Path]:
    """The raw documents of a corpus folder (provenance files excluded)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != SOURCES_FILE and path.relative_to(folder).parts[0] != path.name:
            yield path


def upload_corpus(
    store: ObjectStore,
    bucket: str,
    folder: Path,
    prefix: str = "",
    domains: Iterable[str] | None = None,
    per_domain: int | None = None,
    skip_per_domain: int = 0,
    full: bool = False,
) -> list[str]:
    """Uploads `<domain>/<file>` objects (optionally under `prefix`, only some domains, or a slice of each
    domain's files in name order, for small test cycles); returns the keys. A folder with a SOURCES.json
    uploads its demo sample unless `full` (the extension: more of each kind, see docs/data.md)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus folder {folder} does not exist")
    wanted = set(domains) if domains is not None else None
    has_sources = (folder / SOURCES_FILE).is_file()
    sample = {s.path for s in read_sources(folder) if s.demo} if has_sources and not full else None
    store.ensure_bucket(bucket)
    seen: dict[str, int] = {}
    keys = []
    for path in corpus_files(folder):
        rel = path.relative_to(folder).as_posix()
        domain = rel.split("/")[0]
        if (wanted is not None and domain not in wanted) or (sample is not None and rel not in sample):
            continue
        position = seen[domain] = seen.get(domain, -1) + 1
        if position < skip_per_domain or (per_domain is not None and position >= skip_per_domain + per_domain):
            continue
        store.put_file(bucket, prefix + rel, path)
        keys.append(prefix + rel)
    return keys


def default_corpus_dir() -> Path:
    """The committed sample corpus (data/corpus at the repository root; `latentmas/data/corpus` when installed)."""
    return Path(__file__).resolve().parent.parent / "data" / "corpus"


def written_dir() -> Path:
    """The documents written for this project (data/corpus-written), whatever folder `generate` writes to."""
    return default_corpus_dir().parent / "corpus-written"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentmas.jobs.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_corpus_dir(), help="output folder (emptied first)")
    parser.add_argument("--math", type=int, default=900, help="number of generated math problems")
    parser.add_argument("--extension-only", action="store_true", help="rewrite only the files outside the demo sample")
    args = parser.parse_args(argv)
    import sysconfig

    if args.extension_only:
        sources = regenerate_extension(args.out)
    else:
        sources = generate(args.out, Path(sysconfig.get_paths()["purelib"]), args.math)
    size = sum((args.out / s.path).stat().st_size for s in sources)
    print(f"corpus: {len(sources)} files, {size / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
