"""Keeps the guide's code links pointing at the right lines: recomputes each `lines A-B](path#LA-LB)`
anchor in docs/guide/*.md from the function or class it names (listed below, in link order).

    python docs/guide/anchors.py      # after the code moved; then review `git diff docs/guide`

Not for checking what the pages say about the code: only where the links point.
"""
import ast, re, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
# link path -> symbol (dotted) in order of appearance per file; or ("text", start, end-marker)
SYMBOLS = {
 "01-tokenizer.md": [("src/scratchlm/tokenizer/merging.py", "_learn_merges_py"), ("src/scratchlm/tokenizer/merging.py", "_merge_by_scan")],
 "02-data.md": [("src/scratchlm/data/shards.py", "ShardWriter.add_document+ShardWriter._write"), ("src/scratchlm/data/loader.py", "TokenLoader.next_batch")],
 "03-model.md": [("src/scratchlm/model/transformer.py", "Block.forward"), ("src/scratchlm/model/layers.py", "Attention.forward"),
                 ("src/scratchlm/model/layers.py", "rope_cos_sin+apply_rope"), ("src/scratchlm/model/layers.py", "sinusoidal_embeddings"),
                 ("src/scratchlm/model/transformer.py", "Transformer.embed"), ("src/scratchlm/model/layers.py", "MLP.forward")],
 "04-pretraining.md": [("src/scratchlm/train/trainer.py", "text:while progress.step < cfg.max_steps:|_accumulate("), ("src/scratchlm/train/trainer.py", "_apply_update"),
                       ("src/scratchlm/train/pretrain.py", "PretrainTask.loss"), ("src/scratchlm/train/schedule.py", "lr_factor")],
 "05-scaling-out.md": [("src/scratchlm/train/trainer.py", "Strategy.wrap+Strategy.any"), ("src/scratchlm/train/parallel.py", "DDPStrategy"), ("src/scratchlm/train/parallel.py", "FSDPStrategy.wrap+FSDPStrategy.no_sync")],
 "06-fine-tuning.md": [("src/scratchlm/posttrain/sft.py", "masked_lm_loss"), ("src/scratchlm/posttrain/chat_template.py", "render_chat"), ("src/scratchlm/model/lora.py", "LoRALinear.forward")],
 "07-dpo.md": [("src/scratchlm/posttrain/dpo.py", "dpo_loss"), ("src/scratchlm/posttrain/dpo.py", "sequence_logps")],
 "08-evaluation.md": [("src/scratchlm/eval/bpb.py", "bits_per_byte_tokens"), ("src/scratchlm/eval/tasks.py", "_score_likelihood")],
 "09-inference.md": [("src/scratchlm/infer/generate.py", "BatchDecoder.step"), ("src/scratchlm/model/layers.py", "Attention.forward"), ("src/scratchlm/infer/sampling.py", "Sampler.__call__+Sampler._draw")],
 "10-quantization.md": [("src/scratchlm/model/quant.py", "group_params+quantize_weight"), ("src/scratchlm/model/quant.py", "gptq_quantize_weight"),
                        ("src/scratchlm/model/quant.py", "awq_search_scale"), ("src/scratchlm/model/quant.py", "tune_scales")],
 "11-serving.md": [("src/scratchlm/infer/scheduler.py", "Scheduler._decode_step"), ("src/scratchlm/infer/scheduler.py", "Scheduler._take_tokens"),
                   ("src/scratchlm/infer/server.py", 'text:@app.post("/v1/chat/completions")|"choices": choices, "usage"')],
}
def node_span(tree, dotted):
    node = tree
    for part in dotted.split("."):
        node = next(n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.name == part)
    return (node.decorator_list[0].lineno if node.decorator_list else node.lineno), node.end_lineno
def span(path, sym):
    text = (ROOT / path).read_text()
    if sym.startswith("text:"):
        a, b = sym[5:].split("|")
        lines = text.splitlines()
        s = next(i for i, l in enumerate(lines) if a in l) + 1
        e = next(i for i, l in enumerate(lines) if i >= s and b in l) + 1
        return s, e
    tree = ast.parse(text)
    parts = [node_span(tree, p) for p in sym.split("+")]
    return min(p[0] for p in parts), max(p[1] for p in parts)
LINK = re.compile(r"(lines? )(\d+)(?:-(\d+))?(\]\(\.\./\.\./)([^)#]+)#L\d+(?:-L\d+)?\)")
for name, syms in SYMBOLS.items():
    p = ROOT / "docs/guide" / name
    s = p.read_text()
    it = iter(syms)
    def fix(m):
        path, sym = next(it)
        assert path == m.group(5), (name, path, m.group(5))
        a, b = span(path, sym)
        return f"lines {a}-{b}{m.group(4)}{path}#L{a}-L{b})"
    s2 = LINK.sub(fix, s)
    rest = list(it)
    assert not rest, (name, rest)
    p.write_text(s2)
    print(name, "ok")
