"""The s3a jars an image bakes into Spark's own jars folder: hadoop-aws of exactly the Hadoop version the
pyspark wheel bundles, plus the AWS SDK bundle that hadoop-aws release was built against (read from its
POMs on Maven Central). Baked in, they are on every driver's and executor's classpath from JVM start, so
no `spark.jars.packages` resolution is needed at run time (too late in a SparkApplication driver, and
pods usually have no route to Maven Central).

    python -m latentmas.sparkjars [--dest DIR]   # default: the installed pyspark's jars folder
"""

from __future__ import annotations

import argparse
import hashlib
import re
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}
_CLIENT_API = re.compile(r"^hadoop-client-api-(\d+\.\d+\.\d+)\.jar$")


def spark_home() -> Path:
    """The Spark distribution inside the pyspark wheel (bin/spark-class, bin/spark-submit, jars/)."""
    import pyspark

    return Path(pyspark.__file__).parent


def bundled_hadoop_version(jars: Path) -> str:
    """The Hadoop version of the client jars in a Spark jars folder (what hadoop-aws must match exactly)."""
    versions = {m.group(1) for p in jars.iterdir() if (m := _CLIENT_API.match(p.name))}
    if len(versions) != 1:
        raise ValueError(f"{jars}: expected one hadoop-client-api jar, found versions {sorted(versions) or 'none'}")
    return versions.pop()


def artifact_url(group: str, artifact: str, version: str, ext: str) -> str:
    return f"{MAVEN_CENTRAL}/{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}.{ext}"


def _properties(pom: ET.Element) -> dict[str, str]:
    props = pom.find("m:properties", POM_NS)
    return {} if props is None else {el.tag.split("}", 1)[1]: (el.text or "").strip() for el in props}


def dependency_version(pom_xml: str, group: str, artifact: str, parent_xml: str = "") -> str:
    """The version a POM gives a dependency, resolving `${property}` in the POM or its parent POM
    (hadoop-aws declares `${aws-java-sdk.version}`; hadoop-project defines it in dependencyManagement)."""
    pom, parent = ET.fromstring(pom_xml), ET.fromstring(parent_xml) if parent_xml else None
    properties = {**(_properties(parent) if parent is not None else {}), **_properties(pom)}
    for root in (pom, parent):
        for dep in [] if root is None else root.iter(f"{{{POM_NS['m']}}}dependency"):
            if dep.findtext("m:groupId", "", POM_NS) == group and dep.findtext("m:artifactId", "", POM_NS) == artifact:
                version = dep.findtext("m:version", "", POM_NS).strip()
                if not version:
                    continue
                resolved = re.sub(r"\$\{([^}]+)\}", lambda m: properties.get(m.group(1), m.group(0)), version)
                if "${" not in resolved:
                    return resolved
    raise ValueError(f"no resolvable version for {group}:{artifact} in the POM or its parent")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return bytes(response.read())


def fetch_jar(group: str, artifact: str, version: str, dest: Path) -> Path:
    """One jar from Maven Central, checked against its published SHA-1, written atomically."""
    target = dest / f"{artifact}-{version}.jar"
    expected = _get(artifact_url(group, artifact, version, "jar.sha1")).decode().split()[0]
    if target.exists() and hashlib.sha1(target.read_bytes()).hexdigest() == expected:
        return target
    data = _get(artifact_url(group, artifact, version, "jar"))
    if (actual := hashlib.sha1(data).hexdigest()) != expected:
        raise ValueError(f"{artifact}-{version}.jar: SHA-1 {actual} != published {expected}")
    partial = target.with_suffix(".jar.part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def s3a_jars(spark_jars: Path, dest: Path) -> list[Path]:
    """hadoop-aws matching the Hadoop in `spark_jars` and the AWS SDK bundle it was built with, into `dest`."""
    hadoop = bundled_hadoop_version(spark_jars)
    pom = _get(artifact_url("org.apache.hadoop", "hadoop-aws", hadoop, "pom")).decode()
    parent = _get(artifact_url("org.apache.hadoop", "hadoop-project", hadoop, "pom")).decode()
    sdk = dependency_version(pom, "com.amazonaws", "aws-java-sdk-bundle", parent)
    return [
        fetch_jar("org.apache.hadoop", "hadoop-aws", hadoop, dest),
        fetch_jar("com.amazonaws", "aws-java-sdk-bundle", sdk, dest),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latentmas.sparkjars", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None, help="jars folder (default: the pyspark wheel's)")
    args = parser.parse_args(argv)
    jars = spark_home() / "jars"
    for path in s3a_jars(jars, args.dest or jars):
        print(f"{path} {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
