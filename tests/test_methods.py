"""One table drives every training method through the same behavioural checks:
only the intended parameters train, the base stays frozen, the loss falls on a batch the model
can memorise, and the saved model or adapter, reloaded, gives the same logits."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import write_jsonl
from transformers import TrainerCallback

from adapterkit.config import load_recipe
from adapterkit.stages import run

# (id, method, extra overrides, learning rate, what must be trainable)
TABLE = [
    ("full", "full", [], 3e-3, lambda n: True),
    ("lora", "lora", [], 1e-2, lambda n: "lora_" in n),
    ("lora-dora", "lora", ["adapter.lora.dora=true"], 1e-2, lambda n: "lora_" in n),
    ("lora-rslora", "lora", ["adapter.lora.rslora=true"], 1e-2, lambda n: "lora_" in n),
    ("qlora", "qlora", [], 1e-2, lambda n: "lora_" in n),
    ("prompt_tuning", "prompt_tuning", [], 1e-1, lambda n: "prompt_encoder" in n),
    ("prefix_tuning", "prefix_tuning", [], 1e-1, lambda n: "prompt_encoder" in n),
    ("p_tuning", "p_tuning", [], 1e-2, lambda n: "prompt_encoder" in n),
]

MEMO = [{"text": t, "label": lbl} for t, lbl in [
    ("the film was great", "positive"), ("a dull movie", "negative"), ("wonderful acting", "positive"),
    ("boring and slow", "negative"), ("I loved every minute", "positive"), ("a waste of time", "negative"),
    ("the best meal in town", "positive"), ("cold soup and rude staff", "negative"),
]]


class Snapshot(TrainerCallback):
    """Copies of every parameter before and after training, and which ones were trainable."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def load_saved(method: str, out, tiny_model_dir):
    """The final model as a user would load it: plain transformers, plus peft for adapters."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "full":
        return AutoModelForCausalLM.from_pretrained(out / "model")
    from peft import PeftModel

    kwargs = {}
    if method == "qlora":
        kwargs = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=torch.float32),
                      device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, **kwargs)
    if method == "qlora":
        # Pin bitsandbytes' exact 4-bit path: on AVX512-BF16 CPUs its eval forward would otherwise repack
        # the weights and compute with bf16 scales (README: QLoRA on a CPU), which is not what trained.
        from adapterkit.models import standard_4bit_layout

        standard_4bit_layout(base)
    return PeftModel.from_pretrained(base, out / "model")


@pytest.mark.parametrize("name, method, extra, lr, intended", TABLE, ids=[row[0] for row in TABLE])
def test_method_behaviour(tmp_path, tiny_model_dir, name, method, extra, lr, intended):
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    recipe, src = load_recipe("lora-sentiment", [
        f"model.name_or_path={tiny_model_dir}", f"adapter.method={method}", *extra,
        f"data.train={data}", "data.eval=null", "train.max_steps=30", f"train.lr={lr}", "train.warmup_ratio=0",
        "train.schedule=constant", "train.batch_size=8", "train.log_every=1", "train.save_every=null",
        "train.precision=fp32", f"output_dir={tmp_path / 'run'}",
    ] + (["adapter.lora.dropout=0"] if "lora" in method else []))
    snap = Snapshot()
    result = run(recipe, src, echo=False, callbacks=[snap])

    # Only the intended parameters train, and all of them change.
    assert snap.trainable and all(intended(n) for n in snap.trainable), sorted(snap.trainable)[:5]
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    assert changed <= snap.trainable, sorted(changed - snap.trainable)[:5]  # the base stays frozen
    assert changed == snap.trainable, sorted(snap.trainable - changed)[:5]

    # The loss falls well below where it started on a batch the model can memorise.
    log = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses

    # Saved and reloaded, it gives the logits it had in memory.
    batch = result.tokenizer(["the film was great", "a dull movie and boring"], return_tensors="pt", padding=True)
    trained = result.model.eval()
    reloaded = load_saved(method, result.out, tiny_model_dir).eval()
    with torch.no_grad():
        a = trained(**batch).logits.float()
        b = reloaded(**batch).logits.float()
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_qlora_base_is_really_4bit_and_trains(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    recipe, src = load_recipe("qlora-qa", [
        f"model.name_or_path={tiny_model_dir}", "data.task=sentiment", f"data.train={data}", "data.eval=null",
        "train.max_steps=3", "train.save_every=null", f"output_dir={tmp_path / 'run'}",
    ])
    result = run(recipe, src, echo=False)
    base = result.model.get_base_model()
    linear4 = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # every projection in every block: q, k, v, o, gate, up, down
    assert len(linear4) == 7 * base.config.num_hidden_layers
    for layer in linear4:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantisation: the absmax constants are quantised too
        assert not layer.weight.requires_grad


class Batches(TrainerCallback):
    """The keyword arguments of every training forward (a pre-hook on the model)."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, a, kw):
            if torch.is_grad_enabled():
                self.seen.append({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)})
        self.handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def test_packed_sft_trains_and_never_attends_across_examples(tmp_path, tiny_model_dir):
    """With packing, each row holds several examples; position ids restart at each one, so the
    logits of a packed example equal its logits alone. Rows stay rows (sdpa would otherwise attend
    over the whole batch as one sequence under a block mask)."""
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    batches = Batches()
    recipe, src = load_recipe("lora-sentiment", [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.eval=null", "data.packing=true",
        "data.max_length=128", "train.batch_size=2", "train.max_steps=20", "train.lr=1e-2",
        "train.schedule=constant", "train.log_every=1", "train.save_every=null", "train.precision=fp32",
        "adapter.lora.dropout=0", f"output_dir={tmp_path / 'run'}",
    ])
    result = run(recipe, src, echo=False, callbacks=[batches])
    losses = [json.loads(line)["loss"] for line in (result.out / "train_log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.5 * losses[0], losses
    # What the trainer fed the model: rows of at most max_length, several examples in a row, no mask.
    first = batches.seen[0]
    assert "attention_mask" not in first and first["input_ids"].shape[0] == 2, {k: v.shape for k, v in first.items()}
    assert first["input_ids"].shape[1] <= 128
    starts = (first["position_ids"] == 0) & (first["input_ids"] != result.tokenizer.pad_token_id)
    assert starts.sum(-1).max() > 1  # a row holds more than one example

    # The same batch, example by example: every packed example's logits equal its logits alone.
    model = result.model.eval()
    with torch.no_grad():
        packed = model(input_ids=first["input_ids"], position_ids=first["position_ids"]).logits
        for row in range(2):
            ids, pos = first["input_ids"][row], first["position_ids"][row]
            begins = [i for i in range(len(ids)) if pos[i] == 0] + [len(ids)]
            for b, e in itertools.pairwise(begins):
                if ids[b] == result.tokenizer.pad_token_id:
                    continue  # the row's padded tail
                alone = model(input_ids=ids[b:e][None]).logits[0]
                # Float rounding differs with the sequence length (sdpa kernels tile differently), up
                # to ~1e-5 on logits of order 5; attention leaking across examples moves them far more.
                assert torch.allclose(packed[row, b:e], alone, atol=1e-4), (packed[row, b:e] - alone).abs().max()


def test_packing_falls_back_to_padded_batches_where_attention_ignores_position_ids(tmp_path, tiny_model_dir):
    """OPT builds its causal mask without position ids, so packed examples would attend to each other:
    the run measures that on the model before training and pads its batches instead, saying so."""
    from transformers import AutoTokenizer, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from adapterkit.stages.trainer import packing_isolates_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, init_std=0.3)
    opt_dir = tmp_path / "opt"
    OPTForCausalLM(config).save_pretrained(opt_dir)
    tok.save_pretrained(opt_dir)
    assert packing_isolates_examples(LlamaForCausalLM.from_pretrained(tiny_model_dir)) == (True, 0.0)
    isolated, change = packing_isolates_examples(OPTForCausalLM.from_pretrained(opt_dir))
    assert not isolated and change > 1e-2

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    batches = Batches()
    recipe, src = load_recipe("lora-sentiment", [
        f"model.name_or_path={opt_dir}", f"data.train={data}", "data.eval=null", "data.packing=true",
        "train.batch_size=2", "train.max_steps=2", "train.save_every=null", "train.precision=fp32",
        f"output_dir={tmp_path / 'run'}"])
    result = run(recipe, src, echo=False, callbacks=[batches])
    assert json.loads((result.out / "manifest.json").read_text())["packing"] is False
    first = batches.seen[0]
    assert "attention_mask" in first and first["input_ids"].shape[0] == 2
    starts = (first.get("position_ids", torch.zeros(1)) == 0).sum(-1) if "position_ids" in first else None
    assert starts is None or starts.max() <= 1  # one example per row


# The preference stages through the same checks: a fresh LoRA adapter on the tiny model, pairs (dpo) or
# judged completions (kto) it can memorise.
PREFERENCE_TABLE = [
    ("dpo", "dpo-preference", lambda: [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in FRUIT]),
    ("kto", "kto-feedback", lambda: [row for p, c, r in FRUIT for row in (
        {"prompt": p, "completion": c, "label": True}, {"prompt": p, "completion": r, "label": False})]),
]
FRUIT = [(f"Which fruit is {colour}?", good, bad) for colour, good, bad in [
    ("yellow", "A banana.", "A cherry."), ("red", "A cherry.", "A banana."), ("orange", "An orange.", "A plum."),
    ("purple", "A plum.", "An orange."), ("green", "A lime.", "A lemon."), ("brown", "A date.", "A lime."),
    ("pink", "A peach.", "A date."), ("blue", "A blueberry.", "A peach.")]]


@pytest.mark.parametrize("stage, recipe_name, rows", PREFERENCE_TABLE, ids=[row[0] for row in PREFERENCE_TABLE])
def test_preference_stage_behaviour(tmp_path, tiny_model_dir, stage, recipe_name, rows):
    from adapterkit.trained import load_trained

    data = write_jsonl(tmp_path / "pairs.jsonl", rows())
    recipe, src = load_recipe(recipe_name, [
        f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "data.eval=null", "train.max_steps=30",
        "train.lr=1e-2", "train.warmup_ratio=0", "train.schedule=constant", "train.batch_size=8",
        "train.log_every=1", "train.save_every=null", "train.precision=fp32", "adapter.lora.dropout=0",
        f"output_dir={tmp_path / 'run'}"])
    snap = Snapshot()
    result = run(recipe, src, echo=False, callbacks=[snap])

    # Only the policy's LoRA weights train (not the base, not trl's reference), and all of them change.
    assert snap.trainable and all("lora_" in n and ".default" in n for n in snap.trainable), sorted(snap.trainable)[:5]
    changed = {n for n in snap.before if not torch.equal(snap.before[n], snap.after[n])}
    assert changed == snap.trainable, sorted(changed ^ snap.trainable)[:5]

    log = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses

    # Saved (without trl's reference copy) and reloaded, it gives the logits it had in memory.
    batch = result.tokenizer(["Which fruit is yellow? A banana."], return_tensors="pt")
    reloaded = load_trained(result.out)
    assert set(reloaded.model.peft_config) == {"default"}
    with torch.no_grad():
        a = result.model.eval()(**batch).logits.float()
        b = reloaded.model(**batch).logits.float()
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
