"""The preference stages: `dpo` (pairs: prompt, chosen, rejected) and `kto` (unpaired examples judged
desirable or not), on trl's DPOTrainer and KTOTrainer, usually after an SFT run.

    adapterkit recipe run dpo-preference model.from_run=runs/sft1 data.train=pairs.jsonl

Top to bottom: check the output dir; find the starting point (an earlier run's base and adapter, or a
model); read, validate and format the data with the shared formatter (in the starting run's own
template); load the model; train; score held-out pairs with the starting and the tuned policy;
publish the final adapter atomically.

The reference model is the starting policy, frozen, and never a second copy of the base. After a LoRA
run (`preference.start_adapter: merge`, what auto picks there) the run's adapter is merged into the
base and a new adapter trains on top: it starts as a no-op, so the reference is the model with the
adapter switched off (the merged start), and the saved adapter is the two stacked
(`adapters.lora.stack`), on the original base. When the run's adapter continues instead (a 4-bit base,
DoRA), trl keeps a frozen copy of it (named "ref") on the same base for the reference pass.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterkit import evaluation, models, rundir
from adapterkit import plan as plan_mod
from adapterkit.adapters import METHODS, MethodSpec, lora, trainable_parameters
from adapterkit.config import Recipe, load_recipe
from adapterkit.data.formatter import OWN_CUE, DataReport, FormatSpec, Formatter
from adapterkit.data.clean import RecipeCleaning
from adapterkit.data.loading import RawRow, read_rows, read_training_rows
from adapterkit.doctor import DoctorCallback
from adapterkit.errors import AdapterkitError, ConfigError, DataError, Problem
from adapterkit.stages.skeleton import (
    Context,
    Data,
    Prepared,
    describe_source,
    refuse_unusable,
    too_many_dropped,
)
from adapterkit.stages.trainer import (
    Auto,
    build_trainer,
    guarded_trainer_class,
    tracker_callbacks,
    trainer_args,
    use_kernels,
)
from adapterkit.trained import locate


@dataclass
class Start:
    """Where a preference stage starts from."""

    source: str
    """The base weights: a hub id or directory."""
    method: MethodSpec
    adapter_dir: Path | None = None
    """An earlier run's adapter, which keeps training (and is the reference); None for a fresh adapter."""
    from_run: Path | None = None
    run_recipe: Recipe | None = None
    format: FormatSpec | None = None
    """The earlier run's format (template mode, chat template, system prompt), reused for the prompts."""
    merge: bool = False
    """`adapter_dir` is merged into the base and a new adapter (`method`, the recipe's) trains on top."""
    note: str | None = None
    """Why `preference.start_adapter: auto` continues the run's adapter instead of merging it."""


def starting_point(recipe: Recipe) -> Start:
    """The base, method and adapter to start from: `model.from_run`, or `model.name_or_path` with the
    recipe's adapter."""
    m = recipe.model
    if m.from_run is None:
        return Start(models.model_source(m), METHODS[recipe.adapter.method])
    run_dir, model_dir = locate(m.from_run)
    if run_dir is None:
        raise AdapterkitError(Problem("model.from_run", f"'{m.from_run}' is a model directory, not a run",
                                      fix="pass the run's output_dir, or use model.name_or_path for a plain model"))
    manifest = rundir.read_manifest(run_dir)
    run_recipe, _ = load_recipe(str(run_dir / "recipe.yaml"))
    saved_format = model_dir / "format.json"
    fmt = FormatSpec(**json.loads(saved_format.read_text())) if saved_format.is_file() else None
    method = METHODS[manifest["method"]]
    if method.continues is not None:
        merge, note = merge_or_continue(recipe, method, model_dir)
        if merge:
            # The run's adapter is merged into its base; the recipe's own adapter trains on top.
            return Start(manifest["model_source"], METHODS[recipe.adapter.method], model_dir, run_dir, run_recipe,
                         fmt, merge=True)
        # The adapter continues: its method (lora or qlora) and settings are the run's.
        return Start(manifest["model_source"], method, model_dir, run_dir, run_recipe, fmt, note=note)
    if method.trains_base:
        # A full fine-tune (or pretraining) produced whole weights: they are the base of a new adapter.
        return Start(str(model_dir), METHODS[recipe.adapter.method], None, run_dir, run_recipe, fmt)
    raise AdapterkitError(Problem("model.from_run", f"run '{run_dir}' trained a {method.name} soft prompt, which "
                                  "cannot continue as a preference stage",
                                  fix="start from a lora, qlora or full run, or from a plain model"))


def merge_or_continue(recipe: Recipe, run_method: MethodSpec, adapter_dir: Path) -> tuple[bool, str | None]:
    """Whether a run's adapter is merged into its base under `preference.start_adapter` (with a new
    adapter on top), and, when `auto` continues it instead, why."""
    asked = recipe.preference.start_adapter
    if asked == "continue":
        return False, None
    own = METHODS[recipe.adapter.method]
    if run_method.quantized_base:
        why = f"the run's base is 4-bit ({run_method.name}), and merging into it would round the adapter away"
    elif own.quantized_base or own.family != "lora":
        why = f"the new adapter would be {own.name} (adapter.method), and only a lora adapter trains on a merged base"
    elif recipe.adapter.lora.dora:
        why = "the new adapter would be DoRA (adapter.lora.dora), whose magnitude vectors do not stack"
    else:
        problem = lora.stack_problem(adapter_dir)
        why = None if problem is None else f"the run's adapter cannot be stacked with a new one: {problem}"
    if why is None:
        return True, None
    if asked == "merge":
        raise ConfigError(Problem("preference.start_adapter", f"'merge' cannot apply: {why}",
                                  fix="use preference.start_adapter=continue (keeps training the run's adapter)"))
    return False, f"preference.start_adapter (auto): the run's adapter continues, since {why}"


def format_rows(rows: list[RawRow], formatter: Formatter, split: str, source: str) -> tuple[list[dict], DataReport]:
    """Validate preference rows and render them in TRL's vocabulary (prompt/chosen/rejected or
    prompt/completion/label); drop (and count) rows that cannot train."""
    if not rows:
        raise DataError(Problem(source, f"the {split} data is empty (no rows)", f"data.{split}",
                                fix="check the file (or the hub split) holds rows"))
    formatter.check_columns(rows, source)
    report = DataReport(split=split, source=source, rows_read=len(rows))
    records, seen = [], set()
    for raw in rows:
        fields, reason = formatter.fields(raw)
        if fields is None:
            report.dropped[reason] += 1
            continue
        if fields.get("chosen") is not None and fields["chosen"] == fields.get("rejected"):
            report.dropped["chosen and rejected are the same"] += 1
            continue
        record = formatter.record(fields)
        key = (json.dumps(record, sort_keys=True, ensure_ascii=False), raw.copy)  # a mix's repeat is no duplicate
        if key in seen:
            report.dropped["duplicate of an earlier row"] += 1
            continue
        seen.add(key)
        records.append(record)
        if formatter.keeps_own_cue(fields):
            report.notes[OWN_CUE] += 1
        if "label" in record:
            report.labels["desirable" if record["label"] else "undesirable"] += 1
    report.examples = len(records)
    return records, report


def _conversational(rows: list[RawRow], formatter: Formatter) -> bool:
    for raw in rows[:50]:
        fields, _ = formatter.fields(raw)
        if fields is not None:
            return isinstance(fields.get("prompt"), list)
    return False


KEEPS_EVERY_PAIR = "keeps every pair, cutting only a prompt too long to leave the replies room, from the left"
"""What `data.truncation: input` does to preference pairs, for the refusal that suggests it."""


def prepare_data(recipe: Recipe, tokenizer: Any, start: Start) -> tuple[Formatter, list[dict], list[dict] | None,
                                                                        list[DataReport]]:
    """The formatter (in the starting run's template when there is one) and the formatted splits."""
    d = recipe.data
    clean = RecipeCleaning(d, tokenizer, describe_source(d.train))  # before the sources are mixed

    train_rows, mixed = read_training_rows(d.train, d.train_split, d.weights, recipe.train.seed, clean)
    probe = Formatter(FormatSpec(task=d.task, mode="plain"), tokenizer, d.columns)
    formatter = Formatter.for_training(d, tokenizer, [], conversational=_conversational(train_rows, probe))
    if start.format is not None:
        # Ask in the words the starting model was trained with: its template mode, chat template and
        # system prompt (unless the recipe sets its own).
        spec = formatter.spec
        spec.mode = start.format.mode if spec.mode == "plain" else spec.mode
        spec.chat_template = start.format.chat_template or spec.chat_template
        spec.system_prompt = d.system_prompt if d.system_prompt is not None else start.format.system_prompt
        formatter = Formatter(spec, tokenizer, d.columns)
    train, report = format_rows(train_rows, formatter, "train", describe_source(d.train))
    report.cleaned = clean.reasons()
    report.mixed = mixed
    reports = [report]
    refuse_unusable(report, train, d, "train", KEEPS_EVERY_PAIR)
    if recipe.stage == "kto" and len(report.labels) < 2:
        raise DataError(Problem(describe_source(d.train), f"every row is {next(iter(report.labels))}; kto needs "
                                "both desirable (label true) and undesirable (label false) examples", "data.train",
                                fix="add rows with the other label"))
    evaluation_rows = None
    if d.eval is not None:
        evaluation_rows, eval_report = format_rows(read_rows(d.eval, d.eval_split, "data.eval"), formatter, "eval",
                                                   describe_source(d.eval))
        reports.append(eval_report)
        refuse_unusable(eval_report, evaluation_rows, d, "eval")
    return formatter, train, evaluation_rows, reports


# -- fitting tokenized pairs into max_length ------------------------------------------------------------

REPLY_KEYS = ("chosen_ids", "rejected_ids", "completion_ids")
"""The completions of a tokenized trl row: a DPO pair's two replies, or a KTO row's one."""

REPLY_SHARE = 0.25
"""`data.truncation: input` cuts a prompt only when it would leave the replies less than this share of
max_length (or less than all they need)."""


def fit_ids(row: dict[str, list[int]], limit: int, mode: str, bos_id: int | None) -> tuple[dict[str, list[int]], str]:
    """A tokenized row (trl's `prompt_ids` and completion ids) fitted into `limit` tokens, and what was
    done: "fits", "prompt", "reply", "prompt+reply" (`input`), "end" (`end`) or "drop".

    `input`: the prompt stays whole and the replies keep their start, as in trl's cut, as long as that
    leaves the replies REPLY_SHARE of the limit (or all they need); only a prompt too long for that is cut,
    from the left (its end, with the question being answered, stays; so does a first BOS token), so that
    no pair is dropped and none keeps a reply too short to learn from. `end`: trl's keep_start cut at the
    sequence's end, and a row whose prompt alone fills the limit is dropped (no reply token would
    remain). `drop`: a row that does not fit is dropped. A KTO row's `KL_completion_ids` (a completion of
    another row) follow the prompt they are paired with.

    Measured (benchmarks/results/preference_vs_trl-causes.md, builtin:tiny on HH-RLHF at 256 tokens):
    cutting every long prompt from the left, to keep half the limit for the replies, trained worse than
    trl's cut (held-out accuracy 55.3/58.0 vs 60.0/61.3, seeds 0/1), hence the prompt is now cut only when
    it must be; that still measured below trl's cut (56.0 vs 60.0, seed 0), so the shipped dpo-preference
    recipe uses `end`. HH-RLHF's first human turn usually holds the request the later turns argue about."""
    prompt = row["prompt_ids"]
    keys = [k for k in REPLY_KEYS if k in row]
    longest = max(len(row[k]) for k in keys)
    room = min(longest, int(limit * REPLY_SHARE))  # what the replies are guaranteed
    if len(prompt) + longest <= limit:
        out, how = dict(row), "fits"
    elif mode == "drop" or (mode == "end" and len(prompt) >= limit):
        return row, "drop"
    elif mode == "end" or len(prompt) + room <= limit:
        out, how = {**row, **{k: row[k][: limit - len(prompt)] for k in keys}}, "end" if mode == "end" else "reply"
    else:
        out = {**row, **{k: row[k][:room] for k in keys}}
        keep = limit - max(len(out[k]) for k in keys)
        head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] else []
        out["prompt_ids"] = head + prompt[len(prompt) - (keep - len(head)):]
        how = "prompt+reply" if any(len(out[k]) < len(row[k]) for k in keys) else "prompt"
    if "KL_completion_ids" in row:
        out["KL_completion_ids"] = row["KL_completion_ids"][: max(0, limit - len(out["prompt_ids"]))]
    return out, how


FIT_NOTES = {"prompt": "prompt cut from the left",
             "reply": "a reply cut from the right",
             "prompt+reply": "prompt cut from the left and a reply from the right",
             "end": "cut at the end"}
"""What `fit_ids` did, as the data report says it."""


def fitted(dataset: Any, limit: int, mode: str, bos_id: int | None) -> tuple[Any, Counter, list[int]]:
    """A tokenized trl dataset with every row fitted (see `fit_ids`), how many rows each way, and the
    tokens each row needs (prompt plus its longest reply), for the refusal that names a max_length."""
    how: Counter = Counter()
    needed: list[int] = []
    keep: list[int] = []
    columns = ["prompt_ids", *(k for k in (*REPLY_KEYS, "KL_completion_ids") if k in dataset.column_names)]
    rows = {c: [] for c in columns}
    for i, row in enumerate(dataset.select_columns(columns)):
        out, what = fit_ids(row, limit, mode, bos_id)
        how[what] += 1
        needed.append(len(row["prompt_ids"]) + max(len(row[k]) for k in REPLY_KEYS if k in row))
        if what == "drop":
            continue
        keep.append(i)
        for c in columns:
            rows[c].append(out[c])
    dataset = dataset.select(keep)
    for c in columns:
        dataset = dataset.remove_columns(c).add_column(c, rows[c])
    return dataset, how, needed


class _Uncut:
    """A trainer config seen with no max_length: trl's `_prepare_dataset` then tokenizes every row and
    drops none, and adapterkit fits them (`fitted`)."""

    max_length = None

    def __init__(self, args: Any) -> None:
        self._args = args

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


def fitting_trainer_class(base: type, limit: int, mode: str, bos_id: int | None) -> type:
    """`base` (a DPO or KTO trainer) with its tokenized splits fitted into `limit` tokens by
    `data.truncation`; what was done to each split is in `fit_counts[name]` and `fit_needed[name]`."""

    class FittingTrainer(base):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            dataset = super()._prepare_dataset(dataset, processing_class, _Uncut(args), dataset_name)
            dataset, how, needed = fitted(dataset, limit, mode, bos_id)
            counts = self.__dict__.setdefault("fit_counts", {})
            counts[dataset_name], self.__dict__.setdefault("fit_needed", {})[dataset_name] = how, needed
            return dataset

    return FittingTrainer


def record_fit(report: DataReport, how: Counter, needed: list[int], limit: int, mode: str) -> None:
    """Put what fitting did to a split into its data report."""
    for what, note in FIT_NOTES.items():
        if how[what]:
            report.notes[note] += how[what]
    report.truncated = sum(n for what, n in how.items() if what not in ("fits", "drop"))
    if how["drop"]:
        why = ("its prompt alone fills" if mode == "end" else "longer than")
        report.dropped[f"{why} data.max_length={limit} (data.truncation: {mode})"] += how["drop"]
    report.examples -= how["drop"]
    report.needed = needed


def load_model(run: Prepared, start: Start, dev: Any) -> Any:
    """The policy: the starting adapter loaded trainable on its base, or the base wrapped for a fresh one."""
    method, recipe = run.method, run.recipe
    base = models.load_base(recipe.model, run.source, run.precision, method.trains_base,
                            recipe.adapter.quant if method.quantized_base else None, dev=dev)
    checkpointing = run.auto.gradient_checkpointing
    if start.merge:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(start.adapter_dir)).merge_and_unload()
    if start.adapter_dir is None or start.merge:
        return method.wrap(base, recipe.adapter, tokenizer_source=run.source, checkpointing=checkpointing)
    return method.continues(base, start.adapter_dir, checkpointing=checkpointing)


def _config(recipe: Recipe, auto: Auto, out: Path, precision: str, dev: Any, has_eval: bool) -> Any:
    p = recipe.preference
    args = trainer_args(recipe, auto, out, precision, dev, has_eval)
    if recipe.stage == "kto":
        from trl import KTOConfig

        return KTOConfig(**args, beta=p.beta, loss_type=p.loss or "kto", desirable_weight=p.desirable_weight,
                         undesirable_weight=p.undesirable_weight)
    from trl import DPOConfig

    return DPOConfig(**args, beta=p.beta, loss_type=[p.loss or "sigmoid"], label_smoothing=p.label_smoothing)


# -- held-out preference metrics -----------------------------------------------------------------------

def sequence_pairs(dataset: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of trl's tokenized eval set, cut to max_length as trl's collator
    cuts them: DPO gives chosen and rejected of each pair in turn, KTO one completion per row."""
    pairs = []
    for ex in dataset:
        for key in ("chosen_ids", "rejected_ids", "completion_ids"):
            if key in ex:
                prompt = ex["prompt_ids"]
                pairs.append((prompt, ex[key][: max(1, max_length - len(prompt))]))
    return pairs


def score(model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, say: Any,
          name: str) -> list[float]:
    was_training = model.training
    model.eval()
    try:
        return evaluation.sequence_logprobs(model, pairs, pad_id, batch_size,
                                            evaluation.Progress(say, f"{name} scoring", len(pairs)))
    finally:
        model.train(was_training)


def preference_metrics(stage: str, start: list[float], tuned: list[float] | None, labels: list[bool] | None,
                       lengths: list[int], beta: float) -> dict[str, float]:
    """Metrics of one policy (`tuned`, against the starting policy as reference), or of the starting
    policy alone (`tuned` None). Log-probabilities are summed over each completion's tokens."""
    own = tuned if tuned is not None else start
    if stage == "dpo":
        c, r = own[0::2], own[1::2]
        n = len(c)
        out = {"preference_accuracy": 100 * sum(a > b for a, b in zip(c, r)) / n,
               "logp_margin": sum(a - b for a, b in zip(c, r)) / n}
        if tuned is not None:
            # The implicit reward of DPO: beta * (log pi(y|x) - log pi_ref(y|x)).
            rc = [beta * (a - b) for a, b in zip(tuned[0::2], start[0::2])]
            rr = [beta * (a - b) for a, b in zip(tuned[1::2], start[1::2])]
            out.update(reward_accuracy=100 * sum(a > b for a, b in zip(rc, rr)) / n,
                       reward_margin=sum(a - b for a, b in zip(rc, rr)) / n)
        return out
    per_token = [v / max(1, k) for v, k in zip(own, lengths)]
    good = [v for v, y in zip(per_token, labels) if y]
    bad = [v for v, y in zip(per_token, labels) if not y]
    out = {"desirable_logp_per_token": sum(good) / max(1, len(good)),
           "undesirable_logp_per_token": sum(bad) / max(1, len(bad))}
    out["logp_gap"] = out["desirable_logp_per_token"] - out["undesirable_logp_per_token"]
    if tuned is not None:
        rewards = [beta * (a - b) for a, b in zip(tuned, start)]
        out["reward_accuracy"] = 100 * sum((w > 0) == y for w, y in zip(rewards, labels)) / len(rewards)
    return out


# -- the stage --------------------------------------------------------------------------------------

def fit_reports(recipe: Recipe, trainer: Any, reports: list[DataReport], say: Any) -> None:
    """Add what fitting into max_length did to the data reports (printed; the run saves them), and refuse
    a run that would drop more than data.max_dropped of its training pairs that way."""
    d = recipe.data
    lines = []
    for report in reports:
        how, needed = trainer.fit_counts.get(report.split), trainer.fit_needed.get(report.split)
        if how is None:
            continue
        record_fit(report, how, needed, d.max_length, d.truncation)
        done = [f"{FIT_NOTES[w]} {how[w]}" for w in FIT_NOTES if how[w]]
        if how["drop"]:
            done.append(f"dropped {how['drop']}")
        if done:
            lines.append(f"  {report.split}: {sum(how.values()) - how['fits']} of {sum(how.values())} "
                         f"{'pairs' if recipe.stage == 'dpo' else 'rows'} longer than data.max_length={d.max_length} "
                         f"(data.truncation: {d.truncation}): " + ", ".join(done))
    for line in lines:
        say(line)
    train_report = reports[0]
    if sum(train_report.dropped.values()) > d.max_dropped * train_report.rows_read:
        raise DataError(too_many_dropped(train_report, d, describe_source(d.train), KEEPS_EVERY_PAIR))
    if trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0:
        raise DataError(Problem(describe_source(d.eval), f"no eval pair fits data.max_length={d.max_length} "
                                f"(data.truncation: {d.truncation})", "data.truncation",
                                fix="use data.truncation=input (cuts a prompt too long to fit), or raise "
                                    "data.max_length"))


@dataclass
class PreferenceData:
    """The preference stage's own part of a prepared run."""

    start: Start
    train: list[dict]
    evaluation: list[dict] | None
    trainer: Any = None
    """trl's trainer, built (and the pairs tokenized and fitted) before anything is written."""
    parameters: tuple[int, int] = (0, 0)
    """Trainable and total parameters of the policy."""


class PreferenceStage:
    """`dpo` and `kto`: trl's DPOTrainer and KTOTrainer, the reference being the starting policy."""

    def resolve(self, recipe: Recipe) -> tuple[Recipe, dict[str, Any]]:
        if recipe.model.from_run is None:
            return recipe, {}
        start = starting_point(recipe)
        lineage = {"from_run": str(start.from_run.resolve())}
        if start.adapter_dir is None:
            return recipe, lineage
        # The starting run's base is what loads; its adapter is merged into it (the recipe's own adapter
        # trains on top) or continues (its method and settings train). recipe.yaml says which.
        model = dataclasses.replace(start.run_recipe.model, from_run=recipe.model.from_run)
        if start.note:
            lineage["start_adapter_why"] = start.note  # auto chose to continue: prepare says why
        preference = dataclasses.replace(recipe.preference, start_adapter="merge" if start.merge else "continue")
        adapter = recipe.adapter if start.merge else start.run_recipe.adapter
        return dataclasses.replace(recipe, adapter=adapter, model=model, preference=preference), lineage

    def data(self, recipe: Recipe, say: Any = print) -> Data:
        start = starting_point(recipe)
        tokenizer_dir = start.adapter_dir or (start.from_run / "model" if start.from_run else None)
        tokenizer = models.load_tokenizer(recipe.model, str(tokenizer_dir or recipe.model.tokenizer or start.source))
        formatter, train, evaluation_rows, reports = prepare_data(recipe, tokenizer, start)
        return Data(tokenizer, formatter, train, evaluation_rows, reports, start.source)

    def prepare(self, recipe: Recipe, ctx: Context) -> Prepared:
        say = ctx.say
        start = starting_point(recipe)
        data = self.data(recipe, say)
        tokenizer, formatter, train, evaluation_rows, reports = (
            data.tokenizer, data.formatter, data.train, data.evaluation, data.reports)
        config = models.load_config(recipe.model, start.source)
        precision = models.resolve_precision(recipe.train.precision, ctx.dev,
                                             models.count_parameters(config, recipe.model.trust_remote_code))
        say(f"data ({recipe.data.task}, {formatter.spec.mode} template)")
        for report in reports:
            say("  " + report.summary())
        if start.from_run is not None:
            say(f"starting from run {start.from_run} ("
                + ("its adapter merged into the base, a new lora adapter on top; the reference is the merged start)"
                   if start.merge else f"{start.method.name}, its adapter continues and is the frozen reference)"
                   if start.adapter_dir else f"{start.method.name}, as the base)"))
            if ctx.lineage.get("start_adapter_why"):
                say(ctx.lineage["start_adapter_why"])
        problems = models.model_problems(recipe, config, plan_mod.architecture(
            config, recipe.model.trust_remote_code).quantized_matrices)
        if problems:
            raise ConfigError(problems)
        checkpointing, why = plan_mod.resolve_checkpointing(recipe, config, start.source, ctx.dev,
                                                            ctx.procs.num_processes)
        if why:
            say(f"gradient checkpointing (auto): {why}")
        stacked = (lambda saved: lora.stack(start.adapter_dir, saved)) if start.merge else None
        run = Prepared(recipe, Auto(gradient_checkpointing=checkpointing), start.method, start.source, tokenizer,
                       formatter, reports, precision, config, work=PreferenceData(start, train, evaluation_rows),
                       rewrite_saved=stacked)
        # trl tokenizes the pairs when its trainer is built, and only then is it known how many fit
        # max_length: so the trainer is built here, before the run dir is written (a refusal then leaves
        # an earlier run in output_dir as it was).
        run.work.trainer = self._trainer(run, ctx)
        return run

    def _trainer(self, run: Prepared, ctx: Context) -> Any:
        import datasets

        recipe, work, out, say, dev = run.recipe, run.work, ctx.out, ctx.say, ctx.dev
        tokenizer = run.tokenizer
        model = load_model(run, work.start, dev)
        use_kernels(model, recipe, run.method.quantized_base, run.auto, dev, say)
        trainable, total = trainable_parameters(model)
        say(f"model: {run.method.name}, {trainable:,} of {total:,} parameters train "
            f"({100 * trainable / total:.3f}%), {dev.type}, {run.precision}")
        if recipe.stage == "kto":
            from trl import KTOTrainer as Base
        else:
            from trl import DPOTrainer as Base
        d = recipe.data
        trainer = build_trainer(
            fitting_trainer_class(guarded_trainer_class(Base), d.max_length, d.truncation, tokenizer.bos_token_id),
            model,
            args=_config(recipe, run.auto, out, run.precision, dev, work.evaluation is not None),
            train_dataset=datasets.Dataset.from_list(work.train),
            eval_dataset=datasets.Dataset.from_list(work.evaluation) if work.evaluation else None,
            processing_class=tokenizer,
            callbacks=[rundir.ProgressLog(out, echo=ctx.echo),
                       DoctorCallback(run.method.family, recipe.stage, recipe.train.lr, echo=ctx.echo),
                       *tracker_callbacks(recipe, out), *ctx.callbacks],
        )
        if (work.start.adapter_dir is None or work.start.merge) and "ref" in getattr(trainer.model, "peft_config", {}):
            # trl copied the new adapter as the frozen reference ("ref"); a new LoRA adapter is a no-op, so
            # the model with adapters switched off (trl's reference without a copy) is the same policy,
            # computed without the adapter's matmuls.
            trainer.model.delete_adapter("ref")
        fit_reports(recipe, trainer, run.reports, say)
        work.parameters = (trainable, total)
        return trainer

    def train(self, run: Prepared, ctx: Context) -> tuple[Any, dict[str, Any]]:
        recipe, work, out, say = run.recipe, run.work, ctx.out, ctx.say
        tokenizer, trainer, d = run.tokenizer, work.trainer, run.recipe.data
        trainable, total = work.parameters
        metrics: dict[str, Any] = {"trainable_parameters": trainable, "total_parameters": total}
        pairs, labels, lengths = [], None, []
        if work.evaluation:
            pairs = sequence_pairs(trainer.eval_dataset, d.max_length)
            labels = list(trainer.eval_dataset["label"]) if recipe.stage == "kto" else None
            lengths = [len(t) for _, t in pairs]
            previous = rundir.read_manifest(out).get("metrics") or {}
            if "start_logps" in previous:
                start_logps = previous["start_logps"]
            else:
                # Before any step the policy is the starting policy, which is also the reference.
                start_logps = score(trainer.model, pairs, tokenizer.pad_token_id, recipe.eval.batch_size, say, "start")
                if trainer.is_world_process_zero():
                    rundir.update_manifest(out, metrics={**metrics, "start_logps": start_logps})
        result = trainer.train(resume_from_checkpoint=str(ctx.checkpoint) if ctx.checkpoint else None)
        metrics.update(train_loss=result.training_loss, steps=result.global_step,
                       runtime_s=round(result.metrics.get("train_runtime", 0.0), 2),
                       tokens_seen=trainer.state.num_input_tokens_seen)
        if work.evaluation:
            tuned = score(trainer.model, pairs, tokenizer.pad_token_id, recipe.eval.batch_size, say, "tuned")
            beta = recipe.preference.beta
            metrics["pref_before"] = preference_metrics(recipe.stage, start_logps, None, labels, lengths, beta)
            metrics["pref_after"] = preference_metrics(recipe.stage, start_logps, tuned, labels, lengths, beta)
            metrics["pref_n"] = len(work.evaluation)
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")  # trl's frozen copy of the starting adapter, not part of the result
        return trainer, metrics

    def finish(self, run: Prepared, ctx: Context, metrics: dict[str, Any]) -> None:
        if "pref_before" not in metrics:
            return
        recipe = run.recipe
        summary = {"task": recipe.data.task, "n": metrics.pop("pref_n"), "skipped": {},
                   "headline": "preference_accuracy" if recipe.stage == "dpo" else "logp_gap",
                   "base": metrics["pref_before"], "tuned": metrics["pref_after"], "worst": []}
        evaluation.write_report(ctx.out, summary, f"{ctx.src.name}: {recipe.stage} ({run.method.name})",
                                ctx.out / "loss.png")
        ctx.say(evaluation.metrics_table(summary))


STAGE = PreferenceStage()
