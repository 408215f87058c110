"""Exports of a steering vector: native (safetensors + JSON), ds4 (headerless float32 + sidecar) and
llama.cpp GGUF control vectors. An export that would change the vector's operation refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from steering.vectors import SteeringVector, VectorError, unit_rows

DS4_KINDS = ("ffn_out", "attn_out")  # where ds4 applies its directions, before the hyper-connection expand
# ds4 runs only DeepSeek-V4-Flash and loads a file of exactly this many float32s (704,512 bytes), refusing any other.
DS4_SHAPE = (43, 4096)
# The sidecar is ours: ds4 reads only the .f32, and its own builder's sidecar (format
# ds4-directional-steering-v1) defines only format, shape and component, so ours does not borrow that tag.
DS4_SIDECAR_FORMAT = "dialbox-ds4-export-v1"


def export_native(vector: SteeringVector, out_dir: Path) -> list[Path]:
    path = vector.save(out_dir)
    return [path, path.with_suffix(".json")]


def export_ds4(vector: SteeringVector, out_dir: Path) -> list[Path]:
    """ds4's headerless float32 [n_layers, d_model] file (unit rows, zero rows for untouched layers)
    plus its JSON sidecar."""
    if vector.kind not in DS4_KINDS:
        raise VectorError(f"ds4 steers only at ffn_out or attn_out (before the hyper-connection expand); vector "
                          f"{vector.name} is at {vector.kind}: build it at ffn_out (contrast.site_kind=ffn_out)")
    if vector.operation != "project":
        raise VectorError(f"ds4 applies y -= s*v(v.y) (project) and vector {vector.name} is `add`: an export would "
                          "change its meaning; build it with operation=project")
    n_layers, d_model = vector.model["n_layers"], vector.model["d_model"]
    if (n_layers, d_model) != DS4_SHAPE:
        raise VectorError(f"ds4 runs only DeepSeek-V4-Flash and loads only a {DS4_SHAPE[0]} x {DS4_SHAPE[1]} table; "
                          f"vector {vector.name} is for {vector.model.get('model')} ({n_layers} x {d_model}), which ds4 "
                          "would refuse: export it as native, or build it on a run of model=deepseek_v4_flash")
    table = np.zeros((n_layers, d_model), dtype="<f4")
    for layer, v in vector.directions.items():
        table[layer] = unit_rows(v).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{vector.name}.ds4.f32"
    table.tofile(path)
    flag = "--dir-steering-ffn" if vector.kind == "ffn_out" else "--dir-steering-attn"
    sidecar = {"format": DS4_SIDECAR_FORMAT, "shape": [n_layers, d_model], "component": vector.kind.removesuffix("_out"),
               "dtype": "float32", "site": vector.kind, "layers": vector.layers, "model": vector.model.get("model"),
               "name": vector.name, "source": vector.source,
               "usage": f"ds4 --dir-steering-file {path.name} {flag} S  (S=1 removes the direction, S<0 amplifies it)"}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return [path, path.with_suffix(".json")]


def export_gguf(vector: SteeringVector, out_dir: Path) -> list[Path]:
    """A llama.cpp control vector: tensor `direction.<i>` is added to the output of layer i."""
    import gguf

    if vector.operation != "add" or vector.kind != "resid_post":
        raise VectorError(f"llama.cpp control vectors are added to each layer's output (add at resid_post); vector "
                          f"{vector.name} is {vector.operation} at {vector.kind}: build an add vector at resid_post")
    if vector.model.get("family") == "deepseek_v4":
        raise VectorError("llama.cpp control vectors add to one residual vector; DeepSeek-V4's residual is "
                          "hyper-connection streams: export it for ds4 (export.format=ds4) instead")
    if 0 in vector.directions:
        raise VectorError(f"vector {vector.name} has a direction at layer 0, which llama.cpp cannot steer: "
                          "build it without layer 0 (e.g. contrast.layers=[1,...])")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{vector.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", vector.model.get("model_type", ""))
    writer.add_uint32("controlvector.layer_count", len(vector.directions))
    writer.add_string("dialbox.positions", vector.positions)  # llama.cpp ignores it and adds at every position
    for layer, v in vector.directions.items():
        writer.add_tensor(f"direction.{layer}", v.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]


EXPORTS = {"native": export_native, "ds4": export_ds4, "gguf": export_gguf}
