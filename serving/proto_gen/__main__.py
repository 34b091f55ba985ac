"""python -m serving.proto_gen: regenerate the committed stubs from proto/llama4_ep.proto."""

from pathlib import Path

from serving.proto_gen import generate

for path in generate(Path(__file__).parent):
    print(f"wrote {path}")
