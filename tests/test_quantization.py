"""Weight-only quantization (`pllm.quantization`): each format's error stays within its bound per
channel or group, a quantized model decodes through the engine, and the seed API's name works."""

import pytest
import torch

from conftest import tiny_config
from pllm import DiffusionTransformer, EngineConfig, GenerationConfig
from pllm.engine import Engine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEVICE == "cuda" else torch.float64
from pllm.quantization import INT4_GROUP, QuantizedLinear, dequantize, quantize_model, quantize_weight


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_dequantized_weights_are_within_each_formats_bound(precision):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.logspace(-2, 1, 48)[:, None]  # channels of very different scales
    w[3, 7] = 40.0  # an outlier owns its channel's (or group's) scale
    q, scale = quantize_weight(w, precision)
    back = dequantize(q, scale, precision)
    err = (back - w).abs()
    if precision == "int8":  # half a step of each channel's scale
        assert q.dtype == torch.int8 and scale.shape == (48, 1)
        assert (err <= scale / 2 + 1e-6).all()
    elif precision == "fp8":  # e4m3: 3 mantissa bits, half an ulp relative, for values above the subnormals
        assert q.dtype == torch.float8_e4m3fn and scale.shape == (48, 1)
        normal = w.abs() >= scale * 2 ** -6
        assert (err[normal] <= w.abs()[normal] * 2 ** -4 + 1e-6).all() and (err <= scale * 2 ** -9 + w.abs() * 2 ** -4).all()
    else:  # half a step of each group's scale; two values a byte
        assert q.dtype == torch.uint8 and q.shape == (48, 128) and scale.shape == (48, 256 // INT4_GROUP)
        assert (err <= scale.repeat_interleave(INT4_GROUP, 1) / 2 + 1e-6).all()
    assert (back[3, 7] - 40.0).abs() < 1e-3 * 40  # the outlier itself is (nearly) exact
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize_weight(w, "int3")


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_a_quantized_model_decodes_through_the_engine(precision):
    torch.manual_seed(0)
    cfg = tiny_config(attention_mode="block_causal", block_size=4, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2)
    model = DiffusionTransformer(cfg).eval()
    x = torch.randint(4, cfg.vocab_size, (2, 12))
    reference = model(x)
    quantize_model(model, precision)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 4 * cfg.num_hidden_layers and type(model.lm_head) is torch.nn.Linear
    out = model(x)
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < {"int8": 0.02, "fp8": 0.08, "int4": 0.3}[precision], rel
    gen = GenerationConfig(max_new_tokens=8, num_refinement_steps=8, temperature=0.0)
    answers = Engine(model, EngineConfig(max_num_seqs=2)).generate([torch.arange(4, 9), torch.arange(4, 14)], gen)
    assert [len(a) for a in answers] == [8, 8]


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_quantized_models_step_fixed_shape_as_packed(precision):
    # The fixed-shape step (CUDA graphs on a GPU) runs the quantized projections' kernel where it
    # ran the float ones': the packed path's tokens, in a changing batch.
    from test_engine import mixed_requests, run_staggered

    torch.manual_seed(0)
    cfg = tiny_config(attention_mode="block_causal", block_size=8, max_position_embeddings=128, hidden_size=128,
                      intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = quantize_model(DiffusionTransformer(cfg).to(DEVICE, DTYPE).eval(), precision, group_size=64)
    requests = mixed_requests(8)
    config = EngineConfig(max_num_seqs=4, max_batched_tokens=400)
    packed = run_staggered(Engine(model, config, static_step=False), requests)
    engine = Engine(model, config, static_step=True)
    assert run_staggered(engine, requests) == packed
    assert engine.runner.static.num_steps >= engine.stats["steps"] > 0
    assert max(map(len, packed)) > 20


def test_the_seed_api_quantizes_under_the_distributions_name():
    from parallel_llm.quantization import quantize_model as seed_quantize_model

    model = DiffusionTransformer(tiny_config())
    # Bad requests fail before any projection is replaced: an unknown precision, an int4 group size
    # that does not divide an input size (the hidden size, 32) or is odd.
    for precision, group, match in [("int3", 128, "precision must be one of"), ("int4", 48, "does not divide qkv_proj"),
                                    ("int4", 7, "even number")]:
        with pytest.raises(ValueError, match=match):
            seed_quantize_model(model, precision, group_size=group)
        assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    model = seed_quantize_model(model, precision="fp8")
    assert all(m.precision == "fp8" for m in model.modules() if isinstance(m, QuantizedLinear))
    with pytest.raises(ValueError, match="no nn.Linear named"):
        quantize_model(model, "int8")  # nothing left to quantize


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_a_saved_quantized_model_loads_bit_exact(precision, tmp_path):
    import json

    from pllm.checkpoint import load_model, save_pretrained

    torch.manual_seed(0)
    model = quantize_model(DiffusionTransformer(tiny_config(hidden_size=128, intermediate_size=256)).eval(), precision)
    save_pretrained(model, tmp_path / "q")
    section = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert section["precision"] == precision and section["modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    loaded = load_model(tmp_path / "q")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name].view(torch.uint8) if tensor.dtype ==
                                                              torch.float8_e4m3fn else got[name],
                                                              tensor.view(torch.uint8) if tensor.dtype ==
                                                              torch.float8_e4m3fn else tensor), name
    x = torch.randint(4, 90, (1, 9))
    assert torch.equal(loaded(x), model(x))
    loaded_q = loaded.layers[0].attn.qkv_proj.qweight.clone()
    # Cast for a GPU's 16-bit compute (what load_model does on CUDA): the quantized tensors stay as saved.
    half = loaded.to(torch.bfloat16)
    layer = half.layers[0].attn.qkv_proj
    assert layer.dtype == torch.bfloat16 and torch.equal(layer.qweight.view(torch.uint8), loaded_q.view(torch.uint8))
    assert layer.qweight.dtype == want["layers.0.attn.qkv_proj.qweight"].dtype and layer.scale.dtype == torch.float32
    assert half.embed_tokens.weight.dtype == torch.bfloat16 and half.layers[0].mlp_norm.weight.dtype == torch.bfloat16
    assert (half(x).float() - model(x)).norm() / model(x).norm() < 0.05  # bf16 compute, same weights
    # A quantization section that names no valid precision fails naming the file and field.
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization"]["precision"] = "int3"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: field 'quantization'"):
        load_model(tmp_path / "q")


def test_pllm_quantize_saves_logs_and_registers_a_model_that_loads_and_generates(tmp_path, capsys):
    # `pllm quantize` on a saved model: the folder holds the quantized tensors, the run its
    # parameters and size, the registry a version under the alias; the registered model loads
    # bit-exact and generates through its MLflow pyfunc.
    import mlflow
    from mlflow.tracking import MlflowClient
    from serve_fixtures import make_model_dir

    from pllm.checkpoint import load_model
    from pllm.cli import main
    from pllm.registry import resolve_model_source

    source = make_model_dir(tmp_path / "model")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "int8"
    assert main(["quantize", str(source), str(out), "--precision", "int8", "--register", "tiny-int8",
                 "--mlflow-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "registered as models:/tiny-int8@quantized" in printed and "int8" in printed
    saved = load_model(out)
    assert saved.layers[0].mlp.down_proj.qweight.dtype == torch.int8
    assert saved.embed_tokens.weight.dtype == torch.float32  # the model's dtype (float32 here)
    folder, _ = resolve_model_source("models:/tiny-int8@quantized", uri)
    registered = load_model(folder)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(registered.state_dict()[name], tensor), name
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("tiny-int8", "quantized")
    run = client.get_run(version.run_id)
    assert run.data.params["quantization.precision"] == "int8" and run.data.params["source"] == str(source)
    float_mb = sum(t.numel() * t.element_size() for t in load_model(source).state_dict().values()) / 1e6
    assert run.data.metrics["size_mb"] < 0.75 * float_mb  # int8 projections: a byte a weight, not four
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/tiny-int8@quantized")
    finally:
        mlflow.set_tracking_uri(before)
    text = pyfunc.predict(["def f(x):"], params={"max_new_tokens": 4, "num_refinement_steps": 4})
    assert isinstance(text[0], str) and text[0]
    # Quantizing again what is saved quantized is refused, naming the file.
    with pytest.raises(ValueError, match="config.json: the model is saved quantized already"):
        load_model(out, quantize="fp8")


def test_serving_a_model_int4_cannot_quantize_fails_before_any_replica(tmp_path):
    from serve_fixtures import make_model_dir

    from pllm.actors.serve_app import ServeArgs, build_app
    from pllm.cli import build_parser, serve_args

    folder = make_model_dir(tmp_path / "model")  # hidden size 64: not whole groups of 128
    args = serve_args(build_parser().parse_args(["serve", "--model", str(folder), "--quantize", "int4"]))
    assert args.quantize == "int4"
    with pytest.raises(ValueError, match="int4 quantizes inputs in groups of 128; hidden_size is 64"):
        build_app(args)
    with pytest.raises(ValueError):  # pydantic: not a precision
        ServeArgs(model=str(folder), quantize="int3")
