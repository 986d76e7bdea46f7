"""``leanft demo``: every method's parameter count on a real model, and one adapter taught one new answer
end to end: trained, generated through, saved, reloaded with ``PeftModel.from_pretrained`` and merged."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import PeftModel

from . import methods, models, optim
from .measure.params import count_rows, options_for
from .measure.report import text_table


def demo(model_name: str, *, prompt: str, answer: str, steps: int, lr: float, max_new_tokens: int, output: str,
         options: dict) -> None:
    t0 = time.perf_counter()
    fresh = lambda: models.load_model(model_name)[0].eval()  # noqa: E731
    _, tokenizer = models.load_model(model_name)
    task_type = models.task_type(model_name)
    rows = count_rows(lambda method: fresh(), task_type, list(methods.METHODS), options)
    print(f"{model_name}: parameters per method\n" + text_table(rows, list(rows[0])))
    if task_type != "CAUSAL_LM":
        return
    messages = [{"role": "user", "content": prompt}]
    asked = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                         return_tensors="pt", return_dict=True)
    labels = full["input_ids"].clone()
    labels[:, : asked["input_ids"].shape[1]] = -100  # loss on the answer only

    def generate(m) -> str:
        with torch.no_grad():
            out = m.generate(**asked, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, asked["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    torch.manual_seed(0)
    model = methods.apply_method(fresh(), "loretta-rep", task_type, **options_for("loretta-rep", options))
    print(f"\nprompt: {prompt}\nbase model / LoRETTA_rep at its noise-free start: {generate(model)}")
    adamw = optim.FirstOrder(model, model, lambda net, batch: net(**batch).loss, lr, weight_decay=0.01)
    for step in range(steps):
        row = adamw.step(step, 0, [{**full, "labels": labels}])
    model.eval()
    print(f"after {steps} AdamW steps on one example (loss {row['loss']:.4f}): {generate(model)}")
    out_dir = Path(output)
    model.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    reloaded = PeftModel.from_pretrained(fresh(), out_dir).eval()
    print(f"saved to {out_dir} ({size / 1024:.0f} KiB), reloaded: {generate(reloaded)}")
    merged = reloaded.merge_and_unload()
    print(f"merged into a plain {type(merged).__name__}: {generate(merged)}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
