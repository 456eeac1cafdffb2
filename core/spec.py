"""The LatentMASStack spec, defined once. The CRD schema, the operator and every stage's config come
from these models (DESIGN §3). Field names are camelCase on the wire, snake_case in Python."""

from __future__ import annotations

from typing import Any, Literal

from latentmas.basesource import parse_base_uri
from latentmas.names import RESERVED_EXPERT_NAMES
from latentmas.prompts import CONTEXT, FORMAT, QUESTION, template_problem
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

GROUP = "latentmas.io"
VERSION = "v1alpha1"
KIND = "LatentMASStack"
PLURAL = "latentmasstacks"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class SpecModel(BaseModel):
    """Base for every spec section: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class SecretKeyRef(SpecModel):
    name: str = Field(description="Secret in the stack's namespace.")
    access_key_key: str = Field("accessKey", description="Key holding the S3 access key.")
    secret_key_key: str = Field("secretKey", description="Key holding the S3 secret key.")


class StorageSpec(SpecModel):
    endpoint: str = Field(
        "minio:9000", description="S3 endpoint host:port, or file:///path for the embedded local store."
    )
    secure: bool = Field(False, description="Use TLS to reach the endpoint.")
    region: str = "us-east-1"
    raw_bucket: str = Field("raw", description="Bucket where raw documents are dropped.")
    artifacts_bucket: str = Field("artifacts", description="Bucket for cycle artifacts and the registry.")
    credentials_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret with S3 credentials; never copied into the CR, status or ConfigMaps."
    )
    artifact_policy: Literal["Retain", "Delete"] = Field(
        "Retain", description="On stack deletion: keep the stack's artifacts, or delete them (through a finalizer)."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.endpoint.startsWith('file://') || has(self.credentialsSecretRef)",
                    "message": "credentialsSecretRef is required for an S3 endpoint",
                    "fieldPath": ".credentialsSecretRef",
                }
            ]
        }
    )


class Resources(SpecModel):
    """Requests (and limits for memory and GPUs) of one container."""

    cpu: str = Field("1", pattern=QUANTITY_PATTERN)
    memory: str = Field("2Gi", pattern=QUANTITY_PATTERN)
    gpu: int = Field(0, ge=0, le=16, description="GPUs requested through gpuResourceName.")
    gpu_resource_name: str = Field("nvidia.com/gpu", description="Extended resource name of the GPUs.")


class Toleration(SpecModel):
    """A pod toleration, applied to stage Jobs and the inference Deployment."""

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.operator != 'Exists' || !has(self.value)", "message": "value must be empty for Exists"}
            ]
        }
    )


class StageRetry(SpecModel):
    """How often and how long one stage may run before the stack is Degraded."""

    retries: int = Field(2, ge=0, le=20, description="Retries of a failed stage before the stack is Degraded.")
    backoff_seconds: int = Field(
        10, ge=0, le=3600, description="Wait before retry n is backoffSeconds * 2^(n-1), at most 1 hour."
    )
    deadline_seconds: int = Field(
        3600, ge=5, le=7 * 24 * 3600, description="Deadline of one attempt (the Job's activeDeadlineSeconds)."
    )
    resources: Resources | None = Field(None, description="Resources of this stage's Job (default: per stage kind).")
    node_selector: dict[str, str] | None = Field(
        None, description="This stage's pods only (default: the stack's nodeSelector on GPU stages, none on others)."
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=32, description="This stage's pods only (default: the stack's on GPU stages, none on others)."
    )


class BaseModelSpec(SpecModel):
    uri: str = Field(
        "bootstrap",
        description="Where the base comes from: s3://bucket/prefix (a Hugging Face safetensors folder), "
        "pvc://claim/path (mounted read-only in every pod), /abs/path (already mounted), hf://org/name[@revision] "
        "(fetched by the base stage), a .gguf file at any of these or pkg://distribution/path.gguf (dequantized "
        "into baseModel.dtype), or 'bootstrap' to train a small generalist (fast tests only).",
    )
    token_secret_ref: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        max_length=253,
        description="Secret (key 'token') with a hub token for gated hf:// models; read by the base stage only.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    preset: Literal["tiny", "small", "base", "large"] = Field(
        "tiny", description="Size of a bootstrapped base model: tiny (CPU tests), small, base (~110M), large (~0.6B)."
    )
    bootstrap_steps: int = Field(150, ge=1, le=1_000_000, description="Pre-training steps of a bootstrapped base.")
    vocab_size: int | None = Field(None, ge=256, le=262144, description="BPE vocabulary size; default per preset.")

    @field_validator("uri")
    @classmethod
    def _known_source(cls, uri: str) -> str:
        parse_base_uri(uri)
        return uri


class LoraSpec(SpecModel):
    rank: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, le=1024)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=list,
        description="Module names LoRA adapts (e.g. q_proj, v_proj); empty: every linear projection of the base's "
        "attention and MLP blocks, discovered from the model.",
    )


_RESERVED_LIST = ", ".join(sorted(RESERVED_EXPERT_NAMES))
RESERVED_NAME_MESSAGE = f"name is reserved by the API and status ({_RESERVED_LIST})"


class ExpertSpec(SpecModel):
    name: str = Field(
        pattern=NAME_PATTERN,
        max_length=40,
        description=f"Expert (and model) name; not one of {_RESERVED_LIST}.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(self in [" + ", ".join(f"'{n}'" for n in sorted(RESERVED_EXPERT_NAMES)) + "])",
                    "message": RESERVED_NAME_MESSAGE,
                }
            ]
        },
    )
    domain: str = Field(max_length=253, description="Domain label (raw object prefix) whose data trains this expert.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    max_steps: int | None = Field(None, ge=1, description="Overrides pipeline.training.maxSteps.")
    learning_rate: float | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_EXPERT_NAMES:
            raise ValueError(f"{name!r}: {RESERVED_NAME_MESSAGE}")
        return name


class CleaningSpec(SpecModel):
    engine: Literal["spark", "python"] = "python"
    raw_prefix: str = Field("", description="Only raw objects under this prefix; the domain is the next path segment.")
    spark_executors: int = Field(1, ge=1, le=256)
    spark_resources: Resources = Field(default_factory=lambda: Resources(cpu="2", memory="4Gi"))
    min_chars: int = Field(200, ge=0)
    max_symbol_ratio: float = Field(0.4, ge=0.0, le=1.0)
    near_duplicate_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity.")
    chunk_chars: int = Field(800, ge=100, le=20000)
    chunk_overlap: int = Field(120, ge=0, le=5000)
    redact_pii: bool = True


class QuantSpec(SpecModel):
    polynomial_degree: int = Field(2, ge=1, le=4)
    correlation_threshold: float = Field(0.95, gt=0.0, le=1.0)
    drift_reference: str | None = Field(None, description="Object key of a reference metrics parquet.")
    drift_action: Literal["warn", "fail"] = "warn"
    psi_threshold: float = Field(0.2, gt=0.0, description="Population stability index above which a column drifted.")
    ks_threshold: float = Field(0.2, gt=0.0, le=1.0, description="KS statistic above which a column drifted.")
    block_size: int = Field(
        32, ge=2, le=4096, description="Accepted from older specs; the streaming curator reads row batches (no effect)."
    )
    write_features: bool = Field(
        False,
        description="Also write features_full.parquet and the curated features.parquet (nothing downstream reads "
        "them; insights.json and quality.parquet are always written).",
    )


class SynthesisSpec(SpecModel):
    examples_per_chunk: int = Field(2, ge=1, le=20)
    holdout_fraction: float = Field(
        0.15, gt=0.0, lt=0.5, description="Share of near-duplicate groups held out (decides new groups only)."
    )
    split_jaccard: float = Field(
        0.5, gt=0.0, le=1.0, description="Near-duplicate groups (MinHash Jaccard) kept on one side of the split."
    )
    max_group_documents: int = Field(
        64, ge=1, description="Largest near-duplicate group; bigger components are sub-clustered (templated text)."
    )
    min_heldout_documents: int = Field(
        1, ge=1, description="Held-out documents a domain needs for its expert; fewer skips only that expert."
    )
    endpoint: str | None = Field(None, description="Optional OpenAI-compatible endpoint for generation.")
    model: str = Field("default", description="Model name sent to the OpenAI-compatible endpoint.")
    min_quality: float = Field(0.0, ge=0.0, le=1.0, description="Skip documents below this quant quality score.")
    max_answer_chars: int = Field(700, ge=100, le=20000)
    seed: int = 0


class RagSpec(SpecModel):
    embedding_model: str = Field("all-MiniLM-L6-v2", description="Model name or path for sentence-transformers.")
    index_type: Literal["auto", "flat", "hnsw"] = "auto"
    hnsw_threshold: int = Field(50000, ge=1)
    bm25: bool = True
    reranker: str | None = Field(None, description="Local cross-encoder folder for the optional rerank hook.")
    fusion: Literal["rrf", "weighted"] = "rrf"
    quality_boost: float = Field(
        0.0, ge=0.0, le=10.0, description="Boost by quant's document quality (needs the quant stage; 0 = off)."
    )
    eval_queries: int = Field(200, ge=0, le=100000, description="Held-out queries for recall@5 / nDCG@10.")
    gpu: int = Field(0, ge=0, le=8, description="GPUs for the index stage: embeddings run on the GPU (0 = CPU).")


class TrainingSpec(SpecModel):
    image: str = "ghcr.io/latentmas/latentmas:0.1.0"
    resources: Resources = Field(default_factory=lambda: Resources(cpu="2", memory="8Gi", gpu=0))
    max_steps: int = Field(60, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, ge=1, le=1024)
    max_seq_length: int = Field(256, ge=16, le=32768)
    router_mode: Literal["soft", "top1", "top2"] = Field(
        "soft",
        description="Unused: evaluation scores the served routing (inference.routingMode); kept so older specs load.",
    )
    router_feature_layer: int = Field(1, ge=0)
    context_passages: int = Field(
        3,
        ge=0,
        le=16,
        description="Retrieved passages in each SFT and evaluation example, serving's layout: the source chunk among "
        "distractors of other documents (RAFT), clipped to fit maxSeqLength; 0 = bare questions.",
    )
    seed: int = 0
    save_steps: int = Field(20, ge=1, description="Checkpoint to object storage every N steps (resume point).")
    router_hidden: int = Field(64, ge=4, le=8192, description="Hidden width of the router MLP.")
    router_epochs: int = Field(200, ge=1, le=100000, description="Full-batch epochs of router training.")
    router_balance_weight: float = Field(
        0.0, ge=0.0, le=10.0, description="Weight of the load-balancing term in the router loss (0 = off)."
    )
    nodes: int = Field(
        1, ge=1, le=64, description="Pods per expert train Job: >1 runs an indexed Job with a torchrun rendezvous."
    )


class PipelineSpec(SpecModel):
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    synthesis: SynthesisSpec = Field(default_factory=SynthesisSpec)
    rag: RagSpec = Field(default_factory=RagSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    retry: StageRetry = Field(default_factory=StageRetry)


class EvaluationSpec(SpecModel):
    min_improvement: float = Field(
        0.01,
        ge=0.0,
        description="Relative held-out answer-loss gain an expert needs on its own domain over the base and over "
        "every other expert (with a 95% bootstrap interval over documents above 0).",
    )
    gate: Literal["domain", "base"] = Field(
        "domain",
        description="domain: beat the base and every other expert with an interval above 0 (the default); base: "
        "beat the base by minImprovement, no interval — for smoke tests on too few documents to carry one.",
    )
    min_router_accuracy: float = Field(
        0.0, ge=0.0, le=1.0, description="Held-out top-1 accuracy a router needs to be promoted."
    )
    max_heldout_examples: int = Field(200, ge=1, description="Held-out examples per expert used by evaluation.")
    heldout_document_tokens: int = Field(
        4096,
        ge=0,
        le=10_000_000,
        description="Tokens of held-out documents per domain scored as plain text for the expert x domain "
        "perplexity matrix (0 = off).",
    )


class AutoscalingSpec(SpecModel):
    """An optional HorizontalPodAutoscaler for the inference Deployment."""

    enabled: bool = Field(False, description="Create an HPA; the operator then leaves replicas to it.")
    min_replicas: int = Field(1, ge=1, le=64, description="Fewest inference pods the HPA keeps.")
    max_replicas: int = Field(4, ge=1, le=64, description="Most inference pods the HPA starts.")
    target_cpu_utilization: int = Field(
        70, ge=1, le=100, description="Average CPU utilization (% of the request) the HPA aims for."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"}
            ]
        }
    )


PROMPT_MAX_CHARS = 4000


def _template_rule(placeholders: tuple[str, ...]) -> JsonDict:
    """The API server's copy of `latentmas.prompts.template_problem`: a template whose `{...}` are not all
    among `placeholders` (literal braces doubled) or that lacks `{question}` is refused at admission."""
    stripped = "self.replace('{{', '').replace('}}', '')"
    removed = stripped + "".join(f".replace('{{{p}}}', '')" for p in placeholders)
    allowed = ", ".join(f"{{{p}}}" for p in placeholders)
    return {
        "x-kubernetes-validations": [
            {"rule": f"{removed}.matches('^[^{{}}]*$')", "message": f"unknown placeholder; allowed: {allowed}"},
            {"rule": f"{stripped}.contains('{{{QUESTION}}}')", "message": "must contain {question}"},
        ]
    }


def _template(role: str, placeholders: tuple[str, ...]) -> Any:
    allowed = ", ".join(f"{{{p}}}" for p in placeholders)
    return Field(
        None,
        max_length=PROMPT_MAX_CHARS,
        description=f"Replaces the built-in prompt of the {role}; placeholders: {allowed}.",
        json_schema_extra=_template_rule(placeholders),
    )


class _Templates(SpecModel):
    """Per-role templates; which placeholders a role may use is `placeholders(role)`."""

    @classmethod
    def placeholders(cls, role: str) -> tuple[str, ...]:
        return (QUESTION, FORMAT)

    @field_validator("*")
    @classmethod
    def _known_placeholders(cls, template: str | None, info: ValidationInfo) -> str | None:
        if template is not None and info.field_name is not None:
            problem = template_problem(template, cls.placeholders(info.field_name))
            if problem:
                raise ValueError(problem)
        return template


_BASIC = (QUESTION, FORMAT)
_READS = (QUESTION, FORMAT, CONTEXT)


class LatentPromptTemplates(_Templates):
    """LatentMAS agents: their context is the KV cache, so no `{context}`."""

    planner: str | None = _template("Planner (sequential)", _BASIC)
    critic: str | None = _template("Critic (sequential)", _BASIC)
    refiner: str | None = _template("Refiner (sequential)", _BASIC)
    judger: str | None = _template("Judger (sequential, the final agent)", _BASIC)
    math_agent: str | None = _template("math agent (hierarchical)", _BASIC)
    science_agent: str | None = _template("science agent (hierarchical)", _BASIC)
    code_agent: str | None = _template("code agent (hierarchical)", _BASIC)
    summarizer: str | None = _template("summarizer (hierarchical, the final agent)", _BASIC)


TEXT_READERS = frozenset({"critic", "refiner", "judger", "summarizer"})
"""TextMAS agents that read the earlier agents' labelled outputs (`{context}`)."""


class TextPromptTemplates(_Templates):
    """TextMAS agents: the ones that read earlier agents' outputs get them as `{context}`."""

    @classmethod
    def placeholders(cls, role: str) -> tuple[str, ...]:
        return _READS if role in TEXT_READERS else _BASIC

    planner: str | None = _template("Planner (sequential)", _BASIC)
    critic: str | None = _template("Critic (sequential)", _READS)
    refiner: str | None = _template("Refiner (sequential)", _READS)
    judger: str | None = _template("Judger (sequential, the final agent)", _READS)
    math_agent: str | None = _template("math agent (hierarchical)", _BASIC)
    science_agent: str | None = _template("science agent (hierarchical)", _BASIC)
    code_agent: str | None = _template("code agent (hierarchical)", _BASIC)
    summarizer: str | None = _template("summarizer (hierarchical, the final agent)", _READS)


class AgentPromptsSpec(SpecModel):
    """The stack's own agent prompts (unset: the built-in, reference-style ones). `{format}` is the answer
    format's instruction; the single agent keeps the layout its experts were trained on."""

    system: str | None = Field(None, max_length=PROMPT_MAX_CHARS, description="System turn of every agent.")
    answer_format: Literal["free", "boxed", "choice"] = Field(
        "free",
        description="How the final agent answers unless a request says: free (chat), boxed (\\boxed{value}), "
        "choice (\\boxed{A-D}).",
    )
    latent: LatentPromptTemplates = Field(
        default_factory=LatentPromptTemplates, description="Templates of the LatentMAS agents."
    )
    text: TextPromptTemplates = Field(
        default_factory=TextPromptTemplates, description="Templates of the TextMAS agents."
    )


class AgentsSpec(SpecModel):
    """Defaults of the multi-agent pipelines (`latent` and `text`); a chat request may override each."""

    latent_steps: int = Field(8, ge=0, le=512, description="Latent steps per thinking agent (m); 0: no cache.")
    mode: Literal["sequential", "hierarchical"] = Field(
        "sequential",
        description="sequential: planner, critic, refiner, judger; hierarchical: three domain experts, a summarizer.",
    )
    keep_cache: Literal["all", "last_agent", "latent_only"] = Field(
        "all", description="KV cache handed from agent to agent: all of it, the last agent's, only latent."
    )
    positions: Literal["reference", "continuous"] = Field(
        "reference",
        description="Positions after a truncated cache: counted from the kept length (reference) or continued.",
    )
    realign: bool = Field(False, description="Ridge realignment of latent vectors (off, as in the reference).")
    realign_lambda: float = Field(1e-5, gt=0.0, le=1e6, description="Ridge λ of the realignment matrix.")
    prompts: AgentPromptsSpec = Field(
        default_factory=AgentPromptsSpec, description="Prompt templates of the agents and the default answer format."
    )


class InferenceSpec(SpecModel):
    enabled: bool = True
    image: str = "ghcr.io/latentmas/latentmas:0.1.0"
    replicas: int = Field(1, ge=0, le=64)
    resources: Resources = Field(default_factory=lambda: Resources(cpu="2", memory="8Gi", gpu=1))
    routing_mode: Literal["soft", "top1", "top2"] = "top1"
    router_temperature: float = Field(1.0, gt=0.0)
    confidence_threshold: float = Field(0.3, ge=0.0, le=1.0)
    adapter_slots: int = Field(64, ge=1, le=256, description="Adapters resident on the device at once.")
    cpu_cache_adapters: int = Field(32, ge=1, le=4096, description="Adapters kept in the (pinned) CPU tier.")
    max_lora_rank: int = Field(64, ge=1, le=256, description="Largest adapter rank the slots accept.")
    max_batch_size: int = Field(64, ge=1, le=1024, description="Rows decoded together.")
    kv_budget_tokens: int | None = Field(
        None,
        ge=1,
        description="KV-cache positions the engine may hold (rows x longest row); unset: sized from free memory.",
    )
    max_concurrent_requests: int = Field(128, ge=1, le=100000, description="Beyond this, requests get 429.")
    max_prompt_tokens: int = Field(2048, ge=1, le=1000000)
    max_tokens: int = Field(1024, ge=1, le=1000000, description="Cap on completion tokens per request.")
    reload_poll_seconds: float = Field(0.5, gt=0.0, le=3600.0, description="Registry ETag polling period.")
    port: int = Field(8000, ge=1, le=65535)
    agents_pipeline: Literal["latent", "text", "single"] = "single"
    agents: AgentsSpec = Field(default_factory=AgentsSpec)
    auth_secret_ref: str | None = Field(None, description="Secret with key 'token' for bearer auth.")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Optional HPA (replicas then come from it, not from the spec)."
    )


class ScheduleSpec(SpecModel):
    """Retraining schedule: a CronJob whose pod runs `latentmas trigger` against this stack."""

    cron: str = Field(
        pattern=r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$",
        description="Cron expression, e.g. '0 3 * * *'.",
    )
    time_zone: str | None = Field(None, description="IANA time zone of the cron expression (CronJob timeZone).")
    suspend: bool = Field(False, description="Stop scheduling new cycles; running cycles continue.")
    concurrency_policy: Literal["Forbid", "Replace", "Allow"] = Field(
        "Forbid",
        description="When the schedule fires during a cycle: skip it (Forbid), cancel the running cycle (Replace), "
        "or run it afterwards (Allow).",
    )
    starting_deadline_seconds: int | None = Field(None, ge=1, description="CronJob startingDeadlineSeconds.")
    successful_jobs_history_limit: int = Field(3, ge=0, le=100)
    failed_jobs_history_limit: int = Field(1, ge=0, le=100)


class LatentMASStackSpec(SpecModel):
    storage: StorageSpec = Field(default_factory=StorageSpec)
    base_model: BaseModelSpec = Field(default_factory=BaseModelSpec)
    experts: list[ExpertSpec] = Field(min_length=1, max_length=64)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    schedule: ScheduleSpec | None = None
    stages: dict[str, StageRetry] = Field(
        default_factory=dict, description="Per-stage retry/backoff/deadline overrides of pipeline.retry."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Applied to the stack's GPU pods (inference and stage Jobs requesting GPUs); "
        "stages.<stage>.nodeSelector places any one stage.",
    )
    stage_pod_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Added to every stage Job's Pod (a mesh, a log shipper, a test kubelet).",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of every pod of the stack (inference, stage Jobs, trigger)."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, max_length=16, description="Secrets (names) every pod of the stack pulls images with."
    )

    @model_validator(mode="after")
    def _unique_experts(self) -> LatentMASStackSpec:
        """Each expert owns one name and one domain (the API server enforces the same)."""
        for attr in ("name", "domain"):
            seen: set[str] = set()
            for position, expert in enumerate(self.experts):
                value = getattr(expert, attr)
                if value in seen:
                    raise ValueError(f"experts[{position}].{attr}: duplicate {attr} {value!r}")
                seen.add(value)
        return self

    def retry_for(self, stage: str) -> StageRetry:
        """The retry policy of one stage: its override, else pipeline.retry."""
        return self.stages.get(stage, self.pipeline.retry)


# --- status (written by the operator only) ---------------------------------------------------------------------

StageState = Literal["Pending", "Running", "Verifying", "BackingOff", "Succeeded", "Failed", "Cancelled"]
CycleState = Literal["Running", "Succeeded", "Failed", "Cancelled"]
TriggerSource = Literal["annotation", "schedule", "spec"]


class StageProgress(SpecModel):
    """Training progress a stage reports in its `_progress.json`."""

    step: int = Field(ge=0)
    total: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class StageRunStatus(SpecModel):
    state: StageState = "Pending"
    attempts: int = Field(0, ge=0)
    kind: Literal["Job", "SparkApplication"] = "Job"
    job_name: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    message: str | None = None
    progress: StageProgress | None = None
    recipe_hash: str | None = Field(None, description="Hash of this run's recipe slice when its cycle started.")
    reused_from: str | None = Field(
        None, description="Cycle whose artifacts this run reuses (its recipe and inputs are unchanged); no Job ran."
    )


class CycleStatus(SpecModel):
    id: str
    trigger: TriggerSource
    nonce: str
    spec_hash: str = Field(description="Hash of the spec sections the cycle's artifacts depend on (older form).")
    recipe_hash: str | None = Field(None, description="Hash of the recipe fields the cycle builds from.")
    state: CycleState = "Running"
    started_at: str
    finished_at: str | None = None
    message: str | None = None
    stages: dict[str, StageRunStatus] = Field(default_factory=dict)
    raw_digest: str | None = Field(None, description="Digest of the raw listing (keys, ETags) the cycle cleaned.")
    reason: str | None = Field(None, description="Why the cycle ended as it did, e.g. NoNewData.")


class PendingTrigger(SpecModel):
    """A trigger that arrived during a running cycle and waits for it to finish."""

    nonce: str
    source: TriggerSource


class AdapterStatus(SpecModel):
    name: str
    kind: Literal["expert", "router", "index"]
    target: int | None = Field(None, description="Promoted version in registry.json.")
    active: int | None = Field(None, description="Version every reporting inference pod serves.")
    pods_updated: int = Field(0, ge=0, description="Inference pods serving the target version.")


class Condition(SpecModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int = 0


class BuiltRun(SpecModel):
    """Where the current artifacts of one stage run live, and the recipe they were built from."""

    cycle: str
    recipe_hash: str


class StackStatus(SpecModel):
    phase: Literal["Pending", "Evolving", "Ready", "Degraded"] = "Pending"
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    cycle: CycleStatus | None = Field(None, description="The running cycle.")
    last_cycle: CycleStatus | None = Field(None, description="The last finished cycle.")
    cycles_started: int = Field(0, ge=0)
    handled_triggers: list[str] = Field(default_factory=list, description="Recent trigger nonces already acted on.")
    annotation_nonce: str | None = Field(None, description="The last latentmas.io/evolve value acted on.")
    pending_triggers: list[PendingTrigger] = Field(default_factory=list)
    artifacts_spec_hash: str | None = Field(None, description="Spec hash of the last successful cycle (older form).")
    artifacts_recipe_hash: str | None = Field(None, description="Recipe hash of the last successful cycle's artifacts.")
    artifacts_raw_digest: str | None = Field(None, description="Raw listing digest of the last successful cycle.")
    built_runs: dict[str, BuiltRun] = Field(
        default_factory=dict,
        description="Per stage run: the cycle holding its current artifacts and their recipe (a recipe change "
        "re-runs only the runs whose recipe or inputs changed).",
    )
    adapters: list[AdapterStatus] = Field(default_factory=list)
    experts_ready: str = Field("", description="Experts whose target version is served, e.g. 2/3.")
    inference_ready_replicas: int = 0
    endpoint: str | None = None
    last_schedule: str | None = None
    next_schedule: str | None = None
    children_hash: str | None = None
    storage_uid: str | None = Field(
        None, description="Stack uid recorded as owner of the stack-level artifacts (<ns>/<stack>/_stack.json)."
    )
