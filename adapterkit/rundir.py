"""The run directory: what a run leaves behind, and the progress it shows while it trains.

    output_dir/
      recipe.yaml        the resolved recipe (file + overrides + defaults)
      manifest.json      versions, data hashes, seed, device, command, start/end, status, metrics
      data_report.json   rows read, dropped (and why), truncated, tokens, labels
      train_log.jsonl    one line per log step: loss, lr, grad norm, tokens/s; eval losses
      loss.png           training and eval loss curves
      checkpoints/       trainer checkpoints (checkpoint-N)
      model/             the final model (full) or adapter (peft), with tokenizer and format.json
      metrics.json       task metrics of the starting and the tuned model on data.eval (sft runs)
      report.md          those metrics as a before/after table, the loss plot, the worst examples
      worst_examples.jsonl  input, reference and predictions of the lowest-scoring eval rows
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from transformers import TrainerCallback

from adapterkit.errors import AdapterkitError, Interrupted, Problem

MANIFEST = "manifest.json"
RUN_FILES = ("recipe.yaml", MANIFEST, "data_report.json", "train_log.jsonl", "loss.png", "checkpoints", "model",
             "metrics.json", "report.md", "worst_examples.jsonl")
PACKAGES = ("adapterkit", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "tokenizers")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(recipe: dict[str, Any]) -> str:
    """Hash of everything in a resolved recipe that decides the training (all but output_dir)."""
    text = json.dumps({k: v for k, v in recipe.items() if k != "output_dir"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def latest_checkpoint(run_dir: Path, loadable: bool = False) -> Path | None:
    """The newest complete checkpoint (with `loadable`, the newest whose files also read back whole).
    Checkpoints are published by rename once fully written, so every `checkpoint-N` is complete when
    written; half-written ones only ever exist under a `.staging-` name. A file can still be damaged
    later (a disk error, a copy cut short)."""
    found = sorted((p for p in (run_dir / "checkpoints").glob("checkpoint-*")
                    if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in found:
        if not loadable or checkpoint_problem(checkpoint) is None:
            return checkpoint
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a truncated or corrupt file), or None when every file
    reads back: the trainer state as JSON, safetensors by their headers, torch's zip files by their CRCs."""
    import zipfile

    from safetensors import safe_open

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__}: {e})"
    for f in sorted(checkpoint.iterdir()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as weights:
                    weights.keys()
            elif f.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                if bad is not None:
                    return f"{f.name} is corrupt ({bad} fails its checksum)"
            elif f.suffix in (".pt", ".pth", ".bin"):
                return f"{f.name} is not a complete torch file"
        except Exception as e:  # safetensors raises its own error type for a cut-short file
            return f"{f.name} is corrupt or cut short ({str(e).strip().splitlines()[0] if str(e) else type(e).__name__})"
    return None


def plan_output_dir(path: Path, recipe: dict[str, Any], data: dict[str, Any], force: bool = False,
                    restart: bool = False, resume_anyway: bool = False) -> Path | None:
    """Decide, before anything is written, what to do with `output_dir`: start fresh (None) or resume
    from the returned checkpoint. Refuses dirs it should not touch and changed recipes or data."""
    if path.exists() and not path.is_dir():
        raise AdapterkitError(Problem("output_dir", f"'{path}' is a file, not a directory",
                                      fix="choose another output_dir"))
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise AdapterkitError(Problem("output_dir", f"cannot create '{path}': '{parent}' is not a writable directory",
                                      fix="choose another output_dir"))
    if not path.is_dir() or not any(p.name != LOCK for p in path.iterdir()):
        return None
    if not (path / MANIFEST).is_file():
        if force:
            return None
        raise AdapterkitError(Problem("output_dir", f"'{path}' is not empty and is not an adapterkit run",
                                      fix="choose an empty or new output_dir (or pass --force to write into it)"))
    if restart:
        return None
    manifest = read_manifest(path)
    if manifest.get("status") == "completed":
        raise AdapterkitError(Problem("output_dir", f"'{path}' already holds a completed run",
                                      fix="choose another output_dir, or pass --restart to train it again from scratch"))
    checkpoint = latest_checkpoint(path, loadable=True)
    if checkpoint is None:
        return None
    changes = []
    if manifest.get("fingerprint") != fingerprint(recipe):
        try:
            import yaml

            old = _flat(yaml.safe_load((path / "recipe.yaml").read_text()))
        except Exception:  # an unreadable old recipe is still "changed"
            old = {}
        new = _flat(recipe)
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "output_dir")
        changes.append("recipe keys " + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys[:6]))
    if manifest.get("data") != data:
        changes.append("the data files (their sha256 differ)")
    if changes and not resume_anyway:
        raise AdapterkitError(Problem("output_dir", f"'{path}' holds an interrupted run whose {' and '.join(changes)} "
                                      f"changed since {checkpoint.name}",
                                      fix="re-run the original recipe to resume, pass --resume-anyway to resume "
                                          "with the new one, or --restart to start over"))
    return checkpoint


LOCK = ".adapterkit.lock"
"""Held (flock, exclusive) by the process that trains in a run dir; the OS releases it when the
process ends, however it ends, so a killed run never leaves a stale lock."""


@contextlib.contextmanager
def exclusive(path: Path, force: bool = False, take: bool = True) -> Iterator[None]:
    """Hold the run dir's lock while the body runs; refuse (exit 2, naming the holder's pid) when another
    process holds it. Dirs that `plan_output_dir` will refuse (a file, a foreign dir without --force, an
    unwritable parent) are left untouched. `take=False` (the other processes of an accelerate launch,
    which share the main process's run) holds nothing."""
    import fcntl

    parent = next((p for p in [path, *path.parents] if p.exists()), None)
    foreign = path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file() and not (path / LOCK).exists()
    writable = parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if not take or (path.exists() and not path.is_dir()) or (foreign and not force) or not writable:
        yield
        return
    created = [p for p in [path, *path.parents] if not p.exists()]
    had_lock = (path / LOCK).exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AdapterkitError(Problem("output_dir", f"'{path}' is in use: another adapterkit process (pid {holder}) "
                                      "is training in it", fix="wait for that run to finish (re-running its command "
                                      "afterwards resumes or reports it), or choose another output_dir")) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # A run refused before it wrote anything leaves no trace: not its lock, nor the dirs made for it.
        if not had_lock and path.is_dir() and [p.name for p in path.iterdir()] == [LOCK]:
            (path / LOCK).unlink()
            for made in created:
                try:
                    made.rmdir()
                except OSError:
                    break
        os.close(fd)  # releases the lock


def start(path: Path, clear: bool, recipe_yaml: str, manifest: dict[str, Any]) -> None:
    """Create the run dir (clearing a previous run's files if asked) and write the recipe and manifest."""
    if clear and (path / MANIFEST).is_file():
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "recipe.yaml", recipe_yaml)
    manifest = {**manifest, "status": "running", "started": now(), "versions": versions(),
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    write_json(path / MANIFEST, manifest)


def resume(path: Path, checkpoint: Path, say: Any = print) -> int:
    """Mark the run resumed from `checkpoint` and forget log lines written after it; returns its step.
    Newer checkpoints that do not load are moved aside (checkpoints/broken-checkpoint-N), saying why."""
    step = int(checkpoint.name.split("-")[-1])
    for newer in (path / "checkpoints").glob("checkpoint-*"):
        if newer.name.split("-")[-1].isdigit() and int(newer.name.split("-")[-1]) > step:
            why = checkpoint_problem(newer) or "it is incomplete"
            aside = newer.with_name(f"broken-{newer.name}")
            shutil.rmtree(aside, ignore_errors=True)
            newer.rename(aside)
            say(f"skipped {newer.name}: {why}; moved it to {aside} (delete it once you do not need it)")
    manifest = read_manifest(path)
    resumed = manifest.get("resumed", []) + [{"at": now(), "from_step": step}]
    update_manifest(path, status="running", resumed=resumed, finished=None, error=None)
    log = path / "train_log.jsonl"
    if log.exists():
        keep = [line for line in log.read_text().splitlines()
                if line.strip() and (json.loads(line)["step"] <= step)]
        write_atomic(log, "".join(line + "\n" for line in keep))
    for stale in (path / "checkpoints").glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return step


def storage_error(error: BaseException) -> str | None:
    """What went wrong, when `error` is the storage refusing a write (disk full, quota, read-only,
    permission), else None. safetensors reports a full disk as a SafetensorError, not an OSError."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return error.strerror or str(error)
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        for code, what in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                           (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")):
            if f"(os error {code})" in text or what in text:
                return what
    return None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """A run's manifest.json; a corrupt or truncated one is an error naming the file (exit 2), not a traceback."""
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise AdapterkitError(Problem(str(path), f"is not valid JSON{where}: the file is corrupt or was cut short",
                                      fix="restore it from a backup, or re-run the recipe with --restart to train "
                                          "this run again from scratch")) from None
    if not isinstance(manifest, dict):
        raise AdapterkitError(Problem(str(path), "does not hold a JSON object", fix="restore it, or --restart"))
    return manifest


def mark_ended(path: Path, error: BaseException) -> None:
    """Record in the manifest how a run ended early: "interrupted" (Ctrl-C, SIGTERM), with how to resume
    printed to stderr, or "failed" with the error. Best effort: on a full disk the manifest keeps its last
    whole state ("running"), and the error that stopped the run is the one reported."""
    interrupted = isinstance(error, (KeyboardInterrupt, Interrupted))
    how = getattr(error, "signal_name", "SIGINT")
    try:
        if not interrupted:
            update_manifest(path, status="failed", finished=now(), error=f"{type(error).__name__}: {error}")
            return
        update_manifest(path, status="interrupted", finished=now(), error=f"interrupted by {how}")
    except OSError:
        return
    last = latest_checkpoint(path)
    command = read_manifest(path).get("command") or "the same command"
    kept = f"{last.name} is kept" if last else "no checkpoint was written yet"
    print(f"interrupted ({how}): {kept}; re-run `{command}` to {'resume from it' if last else 'start again'}",
          file=sys.stderr, flush=True)


def update_manifest(path: Path, **fields: Any) -> None:
    manifest = read_manifest(path)
    manifest.update(fields)
    write_json(path / MANIFEST, manifest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A temp dir with normal permissions (mkdtemp makes it private), to be published by rename."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place (replacing an older one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


LOSS_PARTS = {"label_loss": "labels", "distill_loss": "teacher"}
"""Parts of a stage's loss that the trainer logs beside it, and their names on the progress line."""


class ProgressLog(TrainerCallback):
    """Prints one line per logging step (step, loss, lr, tokens/s, MFU, ETA) and appends it to
    train_log.jsonl. Tokens are non-padding tokens, summed over processes; MFU (see perf.py) is shown
    when the FLOPs a token costs and the device's peak (per process) are given."""

    def __init__(self, run_dir: Path, echo: bool = True, flops_per_token: float | None = None,
                 peak_flops: float | None = None, processes: int = 1):
        self.path = run_dir / "train_log.jsonl"
        self.echo = echo
        self.flops_per_token, self.peak_flops, self.processes = flops_per_token, peak_flops, processes
        self.t0 = self.t_last = time.perf_counter()
        self.tokens_last = 0
        self.phase = "train"

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.t_last = time.perf_counter()
        self.tokens_last = state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        # The last step is logged even when it is not a multiple of log_every (a run shorter than
        # log_every would otherwise log no loss at all).
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        t = time.perf_counter()
        row: dict[str, Any] = {"step": state.global_step, "time": round(t - self.t0, 3)}
        if "eval_loss" in logs:
            row.update(phase=self.phase, eval_loss=logs["eval_loss"])
            line = f"eval  step {state.global_step:>5} | eval loss {logs['eval_loss']:.4f}"
        elif "loss" in logs:
            tokens = state.num_input_tokens_seen or 0
            rate = (tokens - self.tokens_last) / max(t - self.t_last, 1e-9)
            self.t_last, self.tokens_last = t, tokens
            row.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                       tokens=tokens, tokens_per_s=round(rate, 1))
            mfu = ""
            if self.flops_per_token and self.peak_flops:
                row["mfu"] = round(rate * self.flops_per_token / (self.peak_flops * self.processes), 4)
                mfu = f" | MFU {row['mfu']:.1%}"
            # The trackers of train.report_to come after this callback: they log these beside the loss.
            logs.update({k: row[k] for k in ("tokens_per_s", "mfu") if k in row})
            done = state.global_step / max(state.max_steps, 1)
            eta = (t - self.t0) / done * (1 - done) if done > 0 else 0.0
            lr = logs.get("learning_rate")
            # A loss made of parts (distill: the labels' and the teacher's) shows them too.
            parts = {k: logs[k] for k in LOSS_PARTS if k in logs}
            row.update(parts)
            shown = "".join(f" ({', '.join(f'{LOSS_PARTS[k]} {v:.4f}' for k, v in parts.items())})" if parts else "")
            line = (f"train step {state.global_step:>5}/{state.max_steps} | loss {logs['loss']:.4f}{shown} | "
                    f"lr {lr if lr is not None else float('nan'):.2e} | {rate:,.0f} tok/s{mfu} | "
                    f"eta {duration(eta)}")
        else:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.echo:
            print(line, flush=True)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png from train_log.jsonl: the training loss per step with the eval losses as labelled points
    (before, during and after training), and under it the learning rate and the gradient norm, on
    integer step ticks. None if nothing to plot."""
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"], r.get("phase", "train")) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lr = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
    norm = [(r["step"], r["grad_norm"]) for r in train if r.get("grad_norm") is not None]
    panels = 1 + bool(lr) + bool(norm)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.2 + 1.6 * panels), dpi=110, sharex=True,
                             gridspec_kw={"height_ratios": [3] + [1] * (panels - 1)}, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], "-" if len(train) > 1 else "o",
                label="train loss", lw=1.5)
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o--", label="eval loss", lw=1.2)
        for step, value, phase in evals:
            if phase in ("before", "after"):
                ax.annotate(f"{phase} {value:.3f}", (step, value), textcoords="offset points", xytext=(4, 6),
                            fontsize=8)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.legend()
    for k, (series, label) in enumerate([(s, n) for s, n in ((lr, "learning rate"), (norm, "grad norm")) if s], 1):
        axes[k][0].plot(*zip(*series), lw=1.2, color=f"C{k + 1}")
        axes[k][0].set_ylabel(label, fontsize=8)
    for (a,) in axes:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
