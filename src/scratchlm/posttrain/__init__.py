"""Post-training: turn a pretrained run into a chat model (SFT) and align it on preferences (DPO).

- `chat_template`: messages -> ids + assistant mask (`render_chat`), the HF Jinja template.
- `data` / `defaults`: JSONL conversations and preference pairs; embedded stdlib-derived data.
- `sft` / `dpo`: the tasks and losses the one training loop runs; `pipeline`: the stages end to
  end (`run_sft`, `run_dpo`); `cli`: the `scratchlm sft` / `scratchlm dpo` verbs.
LoRA itself lives in `scratchlm.model.lora`. Not for pretraining, inference or evaluation.
"""
