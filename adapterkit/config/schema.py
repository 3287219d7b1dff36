"""The recipe's schema: typed config classes that the YAML mirrors one to one, with every default.

Defaults live here and only here; the shipped YAML files set what differs from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["pretrain", "sft", "dpo", "kto", "distill"]
Method = Literal["full", "lora", "qlora", "prompt_tuning", "prefix_tuning", "p_tuning"]
Task = Literal["qa", "summarization", "translation", "generation", "sentiment", "text", "chat", "preference",
               "unpaired"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ArchitectureConfig:
    """Explicit Llama-style architecture for `model.init: scratch`; unset fields come from `model.size`."""

    hidden_size: int | None = None
    """Width of the residual stream."""
    num_layers: int | None = None
    """Number of transformer blocks."""
    num_heads: int | None = None
    """Attention heads; must divide hidden_size."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide num_heads. Defaults to num_heads."""
    intermediate_size: int | None = None
    """Width of the MLP."""
    max_position_embeddings: int | None = None
    """Longest sequence the model is built for."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny"
    """Hub id (`Qwen/Qwen2.5-0.5B`), local model directory, or `builtin:tiny`: adapterkit's own small
    base model, pretrained on first use from the `pretrain-tiny` recipe and cached."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """`pretrained` loads weights from name_or_path; `scratch` builds a new model from `size`/`architecture`."""
    size: Literal["tiny", "small", "base"] = "tiny"
    """Size preset for `init: scratch` (tiny ~2M, small ~30M, base ~110M parameters plus embeddings)."""
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """Per-field overrides of the size preset for `init: scratch`."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory. Unset: the model's own; for `init: scratch`, a byte-level BPE
    tokenizer trained on the training corpus."""
    vocab_size: int = 8192
    """Vocabulary size of a tokenizer trained for `init: scratch`."""
    chat_template: str | None = None
    """The chat template to train and answer with, in place of the tokenizer's own: `chatml`, `llama3`,
    `gemma`, `phi3`, or a path to a Jinja file. Checked at load to render a growing conversation, and
    saved with the model (chat, eval, export and GGUF use it). Unset: the tokenizer's own, if it has one."""
    dtype: DType = "auto"
    """Dtype the weights are loaded in. `auto`: float32 for full fine-tuning and scratch (mixed
    precision keeps master weights in float32), bfloat16 for a frozen base where the device supports it."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""
    from_run: str | None = None
    """Start from an earlier run's output_dir (e.g. an SFT run): its base model and, for LoRA/QLoRA runs,
    its adapter, which keeps training (and, for dpo/kto, is also the frozen reference). Replaces
    name_or_path; a full fine-tuning run's model becomes the base."""


@dataclass
class LoraSettings:
    r: int = 16
    """Rank of the low-rank update."""
    alpha: float = 32.0
    """Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): learns a magnitude per output feature as well as a direction."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r), which keeps high ranks from learning slower."""


@dataclass
class QuantSettings:
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base (bitsandbytes)."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves about 0.4 bits per parameter)."""
    compute_dtype: DType = "auto"
    """Dtype the 4-bit weights are dequantised to for matmuls. `auto`: bfloat16 where supported, else float32."""


@dataclass
class PromptSettings:
    num_virtual_tokens: int = 20
    """Number of learned virtual tokens."""
    init_text: str | None = None
    """prompt_tuning only: initialise the virtual tokens from the embeddings of this text."""
    encoder_hidden_size: int | None = None
    """p_tuning only: hidden size of the prompt encoder MLP (default: the model's hidden size)."""


@dataclass
class AdapterConfig:
    method: Method = "lora"
    """What is trained: `full` (every weight), `lora`, `qlora` (LoRA on a 4-bit base), or a soft
    prompt: `prompt_tuning`, `prefix_tuning`, `p_tuning`."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Settings for `lora` and `qlora`."""
    quant: QuantSettings = field(default_factory=QuantSettings)
    """Settings of the 4-bit base for `qlora`."""
    prompt: PromptSettings = field(default_factory=PromptSettings)
    """Settings for the soft-prompt methods."""


@dataclass
class CleanConfig:
    """`data.clean`: clean the training rows before they are formatted, as `adapterkit data clean` cleans
    a file: Unicode NFC and whitespace normalised; empty rows, rows with control characters (or U+FFFD)
    and the checks below dropped; what went is reported with the data and in data_report.json."""

    dedup: bool = True
    """Drop rows whose task fields are exactly those of a row kept before."""
    near_duplicates: float | None = 0.85
    """Jaccard similarity (MinHash, datasketch) at which a row is a near duplicate of one kept before;
    null: keep near duplicates."""
    min_tokens: int | None = None
    """Drop rows whose task fields hold fewer tokens (the run's tokenizer counts)."""
    max_tokens: int | None = None
    """Drop rows whose task fields hold more tokens."""
    languages: list[str] | None = None
    """Keep only rows in these languages (ISO 639-1: en, de, ...; py3langid detects them)."""
    language_confidence: float = 0.9
    """Drop a row for its language only when the detector is at least this sure."""


@dataclass
class DataConfig:
    task: Task = "sentiment"
    """How rows are turned into training text; see the README's table of tasks and fields."""
    train: str | list[str] = "sample:sentiment/train"
    """Training data: local .jsonl/.json/.csv/.parquet/.txt files (.gz too), a folder of such files (read
    by datasets), a datasets hub id, or `sample:TASK/train` for the small samples shipped with adapterkit.
    A list is concatenated."""
    weights: list[float] | None = None
    """Mix the sources of a `train` list in these proportions (one weight per source, e.g. `[0.7, 0.3]`):
    the run trains on as many rows as the sources hold together, drawn from each by its share (a small
    source is repeated, a large one sampled; seeded by train.seed). Unset: the sources are concatenated."""
    streaming: bool = False
    """Pretraining only: read data.train as training goes instead of whole, so a corpus larger than
    memory or disk trains (a hub id in datasets' streaming mode, nothing downloaded ahead; files and
    folders row by row). Needs train.max_steps (a stream has no length); the first rows are read ahead to
    check the data; with data.weights each row comes from a source drawn by weight, a source that runs
    out starts again. data.eval is read as a stream too, its first eval.limit rows."""
    eval: str | list[str] | None = None
    """Held-out data in the same forms; its loss is measured before and after training."""
    train_split: str = "train"
    """Split to read when `train` is a hub id."""
    eval_split: str = "validation"
    """Split to read when `eval` is a hub id."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map from the task's field names to your column names, e.g. `{text: review, label: stars}`."""
    max_length: int = 512
    """Longest example in tokens; see `truncation` for what happens to longer ones."""
    truncation: Literal["input", "end", "drop"] = "input"
    """For examples longer than max_length. `input`: keep the completion whole and shorten the task's long
    input field (qa: context, around the answer where it occurs; summarization: document; translation:
    source; generation: input, then instruction; sentiment: text), marking the cut with "…"; a row is
    dropped only when the completion alone cannot fit. `end`: cut the example at max_length (rows left
    with no supervised token are dropped). `drop`: drop every longer example. Chat and raw text are
    never shortened this way: conversations are cut at the end, raw text is split into chunks.
    Preference pairs (dpo, kto; the shipped dpo-preference recipe sets `end`, which measured better on
    HH-RLHF with builtin:tiny): `input` keeps the prompt whole and cuts the replies' end, as trl does,
    unless that would leave the replies less than a quarter of max_length: then the prompt is cut from the
    left (its end stays, and a first BOS) so that no pair is dropped; `end` is trl's own cut (the
    sequence's end; pairs whose prompt alone fills max_length are dropped); `drop` drops every pair that
    does not fit."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several examples into each sequence of up to max_length tokens: no padding, and attention
    never crosses two examples. `auto`: on, except for soft prompts (which cannot pack)."""
    group_by_length: bool = True
    """Without packing: batch examples of similar length together (batches are drawn at random from
    groups of 50 sorted by length; the longest batch comes first, so a run that runs out of memory
    does so at once), so little of each batch is padding. Off: plain random order."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens, not only on the completion."""
    system_prompt: str | None = None
    """System message for tokenizers with a chat template (and prepended to plain-template prompts)."""
    max_dropped: float = 0.05
    """Largest fraction of training rows that may be dropped (missing or empty field, no supervised
    token within max_length, duplicate) before the run refuses to start."""
    template: str | None = None
    """Plain prompt template overriding the task's, with `{field}` placeholders, e.g. `"Review: {text}\\nLabel:"`."""
    clean: CleanConfig | bool = False
    """Clean the training rows first (see CleanConfig): `true` for the defaults, or a mapping of its
    settings, e.g. `{near_duplicates: 0.9, languages: [en]}`."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data; ignored when max_steps is set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 42
    """Seed for initialisation, dropout and data order."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass: less memory, about 30% more compute. `auto`: on
    only when the memory plan (`adapterkit plan`) says the run would not fit in the device's free
    memory without it."""
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "auto"
    """`adamw` (torch's), or bitsandbytes' 8-bit AdamW (`adamw_8bit`; `paged_adamw_8bit` pages its state
    to CPU RAM when the GPU is full; both CUDA only). `auto`: paged 8-bit for qlora on a GPU, else adamw."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision. `auto`: bf16 where the GPU or CPU supports it, fp16 on older GPUs, else fp32."""
    kernels: Literal["auto", "off", "adapterkit", "liger", "both"] = "auto"
    """Training kernels. `adapterkit`: our fused 4-bit LoRA path for qlora (each projection and each
    gated MLP one autograd function: Triton NF4/FP4 dequantisation in forward and again in backward,
    less kept for backward); `liger`: Liger-Kernel's RoPE, RMSNorm and SwiGLU (`pip install -e ".[gpu]"`);
    `both`; `off`. `auto`: on a CUDA GPU what benchmarks/gpu_kernels.py has measured to help (nothing
    yet: no GPU has measured them), off on a CPU. A kernel that does not apply to the model, method or
    device is left out with one line; the manifest records what ran."""
    log_every: int = 10
    """Print and log loss, learning rate and tokens/s every N steps."""
    report_to: str | list[str] = "none"
    """Experiment trackers, through transformers' own integrations: `none`, `tensorboard`, `wandb`,
    `trackio`, `mlflow`, or a list. Each logs the loss, learning rate and gradient norm, adapterkit's
    tokens/s and MFU, and the eval losses; tensorboard writes to OUTPUT_DIR/tensorboard. The tracker's
    package must be installed (`pip install tensorboard`); wandb runs offline with WANDB_MODE=offline."""
    eval_every: int | None = None
    """Measure the eval loss every N steps (always before and after training when `data.eval` is set)."""
    save_every: int | None = 200
    """Write a checkpoint every N steps (unset: only the final model)."""
    save_total_limit: int = 2
    """Checkpoints to keep."""


PreferenceLoss = Literal["sigmoid", "ipo", "sigmoid_norm", "hinge", "robust", "kto", "apo_zero_unpaired"]
DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm", "hinge", "robust")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class PreferenceConfig:
    """The preference step (stages dpo and kto), on trl's DPOTrainer and KTOTrainer."""

    loss: PreferenceLoss | None = None
    """dpo: `sigmoid` (standard DPO), `ipo`, `sigmoid_norm` (length-normalised DPO: mean log-ratio per
    token, SimPO-style), `hinge`, `robust`; kto: `kto`, `apo_zero_unpaired`. Unset: sigmoid / kto."""
    beta: float = 0.1
    """How far the policy may move from the reference: higher keeps it closer (IPO: the tau regulariser)."""
    label_smoothing: float = 0.0
    """`robust`: the assumed share of flipped preference labels, in [0, 0.5)."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable (label true) examples' loss."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable (label false) examples' loss."""
    start_adapter: Literal["auto", "merge", "continue"] = "auto"
    """After a LoRA run (`model.from_run`): `merge` folds its adapter into the base and trains a new one
    (this recipe's `adapter.lora`) on top, the reference being the merged start; `continue` keeps
    training the run's adapter, a frozen copy being the reference. `auto`: merge where it is exact (a
    plain LoRA run on an unquantised base), else continue, saying why. A merged run saves one adapter
    on the original base: both side by side (rank r1 + r2), exact."""


@dataclass
class DistillConfig:
    """The distill stage: a teacher's token distributions supervise the student (the recipe's model,
    trained with its adapter method) on the recipe's data, mixed with the labels' cross-entropy."""

    teacher: str | None = None
    """The teacher: a run directory (an adapter run is its base with the adapter), a model directory or
    a hub id. It must use the student's tokenizer (same vocabulary and ids), or the stage refuses."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """`forward_kl`: KL(teacher || student), the classic soft-label loss (the student covers every token the
    teacher likes); `reverse_kl`: KL(student || teacher), mode seeking (MiniLLM); `jsd`: the generalised
    Jensen-Shannon divergence with jsd_beta (as trl's GKD defines it)."""
    jsd_beta: float = 0.5
    """`jsd` only: the mixture's weight on the teacher, in (0, 1)."""
    temperature: float = 1.0
    """Both distributions are softened by this temperature before the divergence, which is scaled by
    temperature squared (Hinton et al.), so its gradient keeps the labels' scale."""
    label_weight: float = 0.5
    """Weight of the labels' cross-entropy; the distillation term gets 1 - label_weight. 0: the teacher
    alone (weak-to-strong, where the labels are not to be trusted); 1: plain sft."""
    top_k: int | None = 50
    """Keep the teacher's top-k tokens at each position, with the rest of its probability as one bucket
    (the divergence is taken over those k + 1 outcomes); null: the whole distribution (on the fly only)."""
    cache: bool = False
    """Run the teacher over the training rows once before training and keep its top-k log-probabilities on
    disk (under the adapterkit cache, keyed by teacher, data, top_k and temperature), so the teacher is
    never in memory beside the student and a later run reuses them. Off: the teacher runs on every batch."""
    confidence: float = 0.0
    """Weak-to-strong: the weight of the auxiliary confidence loss (Burns et al. 2023), cross-entropy
    against the student's own hardened (argmax) predictions, mixed into the distillation term and warmed
    up linearly over the first 20% of the steps. 0: off; the paper used 0.75."""


@dataclass
class EvalConfig:
    """Task evaluation of the starting and the tuned model on `data.eval` (sft runs), and of `adapterkit eval`."""

    limit: int | None = 200
    """Evaluate the first this-many usable eval rows (generation is the slow part on a CPU); null for all."""
    max_new_tokens: int | None = None
    """Generation length. Unset: per task (qa 32, summarization/translation 128, generation/chat 256)."""
    batch_size: int = 8
    worst: int = 10
    """How many worst examples report.md and worst_examples.jsonl show."""


@dataclass
class Recipe:
    stage: Stage = "sft"
    """`pretrain` (causal LM on raw text, every token supervised), `sft` (supervised fine-tuning), `dpo`
    (preference pairs), `kto` (unpaired desirable/undesirable examples) or `distill` (a teacher's token
    distributions supervise the model; see `distill`)."""
    description: str = ""
    """One line shown by `adapterkit recipe list`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = None
    """Where the run is written. Unset: `runs/<recipe name>`."""
