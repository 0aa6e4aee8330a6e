"""The counterfactual engine on a tiny in-code model: loading, determinism, strength/steps, cancel, geometry."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from app import engine
from app.modelfolder import ModelFolderError
from app.train.common import encode_prompt_embeddings
from tests.tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    return engine.CounterfactualEngine(folder, device="cpu")


def _image(h: int = 40, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


def test_loads_bert_encoder_and_reports_identity(tiny):
    info = tiny.info
    assert info.text_encoder_type == "BertModel"
    assert info.image_size == 32 and info.image_channels == 1
    assert len(info.model_hash) == 64
    assert info.class_prompts == {"normal": "normal chest x ray"}
    assert info.parameters_m["unet"] > 0


def test_same_seed_same_output_and_different_seed_differs(tiny):
    img = _image()
    a = tiny.generate(img, "normal chest x ray", strength=0.8, steps=5, seed=3)
    b = tiny.generate(img, "normal chest x ray", strength=0.8, steps=5, seed=3)
    c = tiny.generate(img, "normal chest x ray", strength=0.8, steps=5, seed=4)
    np.testing.assert_array_equal(a.counterfactuals, b.counterfactuals)
    assert np.abs(a.counterfactuals - c.counterfactuals).max() > 1e-4
    assert a.seeds == [3]


@pytest.mark.parametrize("steps,strength,expected", [(10, 0.5, 5), (75, 0.85, 63), (10, 1.0, 10), (7, 0.3, 2)])
def test_effective_steps_follow_diffusers_quantisation(tiny, steps, strength, expected):
    seen: list[tuple[int, int]] = []
    r = tiny.generate(_image(), "normal", strength=strength, steps=steps, seed=0,
                      progress=lambda k, n, el, prev: seen.append((k, n)))
    assert r.effective_steps == expected == engine.effective_steps(steps, strength)
    # PNDM (PLMS, skip_prk_steps) makes one extra warm-up evaluation; step 0 comes before the first evaluation
    assert r.unet_evaluations == expected + 1 == len(seen) - 1
    # progress counts denoising steps, as the form does ("15 effective steps" ends at "step 15 of 15")
    assert seen[-1] == (expected, expected) and {n for _, n in seen} == {expected}
    assert [k for k, _ in seen] == [0, *range(1, expected + 1), expected]  # the extra evaluation repeats the last


def test_native_frame_exact_for_odd_sizes(tiny):
    for h, w in [(33, 17), (31, 64), (5, 3)]:
        r = tiny.generate(_image(h, w), "normal", strength=0.5, steps=4, seed=1, samples=2)
        assert r.counterfactuals.shape == (2, h, w)
        assert r.counterfactuals_model.shape == (2, 32, 32)
        assert r.reconstruction.shape == (h, w)
        assert r.counterfactuals.dtype == np.float32
        assert r.counterfactuals.min() >= 0.0 and r.counterfactuals.max() <= 1.0


def test_native_counterfactuals_are_made_on_demand_and_agree(tiny):
    """The engine keeps the model-frame samples; the native ones are unletterboxed on first use (all of them,
    kept) or one at a time, with the same values either way."""
    from app import imaging

    r = tiny.generate(_image(45, 29), "normal", strength=0.5, steps=4, seed=3, samples=3)
    assert "counterfactuals" not in r.__dict__  # nothing resized yet
    one = r.counterfactual(2)
    assert one.shape == (45, 29) and one.dtype == np.float32
    assert np.array_equal(one, imaging.unletterbox(r.counterfactuals_model[2], r.letterbox))
    every = r.counterfactuals
    assert every is r.counterfactuals and every.shape == (3, 45, 29)  # computed once, kept
    assert np.array_equal(every[2], one) and np.array_equal(r.counterfactual(1), every[1])


def test_samples_use_consecutive_seeds_and_match_single_runs(tiny):
    img = _image()
    batch = tiny.generate(img, "normal", strength=0.6, steps=5, seed=10, samples=2)
    single = tiny.generate(img, "normal", strength=0.6, steps=5, seed=11)
    assert batch.seeds == [10, 11]
    np.testing.assert_allclose(batch.counterfactuals[1], single.counterfactuals[0], atol=2e-4)


def test_the_cpu_engine_decodes_one_sample_at_a_time_with_the_batched_result(tiny):
    """The autoencoder decodes the samples one by one on the CPU (caches; docs/PERFORMANCE.md), to rounding the
    same images as one batched decode."""
    assert tiny.pipe.vae.use_slicing
    calls: list[int] = []
    decode = tiny.pipe.vae._decode

    def counting(z, *args, **kwargs):
        calls.append(int(z.shape[0]))
        return decode(z, *args, **kwargs)

    img = _image()
    tiny.pipe.vae._decode = counting
    try:
        sliced = tiny.generate(img, "normal", strength=0.6, steps=5, seed=3, samples=3)
        tiny.pipe.vae.disable_slicing()
        calls_sliced = list(calls)
        batched = tiny.generate(img, "normal", strength=0.6, steps=5, seed=3, samples=3)
    finally:
        tiny.pipe.vae.enable_slicing()
        del tiny.pipe.vae._decode
    assert calls_sliced[:3] == [1, 1, 1]  # the samples, then the reconstruction
    assert 3 in calls[len(calls_sliced):]
    np.testing.assert_allclose(sliced.counterfactuals_model, batched.counterfactuals_model, atol=1e-4)


def test_cancel_stops_within_one_step(tiny):
    cancel = threading.Event()
    calls: list[int] = []

    def progress(k, n, el, prev):
        calls.append(k)
        if k == 2:
            cancel.set()

    with pytest.raises(engine.GenerationCancelled):
        tiny.generate(_image(), "normal", strength=1.0, steps=20, seed=0, progress=progress, cancel=cancel)
    assert calls == [0, 1, 2]
    # the engine stays usable after a cancellation (the lock was released)
    assert tiny.generate(_image(), "normal", strength=0.5, steps=2, seed=0).effective_steps == 1


def test_step_zero_comes_before_the_first_unet_evaluation_and_can_cancel(tiny):
    """The first progress event is step 0, sent once the input is encoded and noised and before any UNet evaluation
    (issue 15: a 16-sample CPU run shows it started before its first step's compute), with the input latent's
    preview; cancelling there stops the run before the UNet runs at all."""
    evaluations: list[int] = []
    hook = tiny.pipe.unet.register_forward_pre_hook(lambda module, args: evaluations.append(1))
    try:
        events: list[tuple[int, int]] = []
        previews = []

        def progress(k, n, el, prev):
            events.append((k, len(evaluations)))
            previews.append(prev)

        r = tiny.generate(_image(), "normal", strength=0.5, steps=4, seed=0, samples=2, progress=progress)
        assert events[0] == (0, 0) and [k for k, _ in events].count(0) == 1
        assert events[1] == (1, 1)  # step 1 after the first evaluation
        assert previews[0].shape == (16, 16) and 0 <= previews[0].min() <= previews[0].max() <= 1
        assert tiny.pipe.on_latents_ready is None  # the hook lives for one call only
        cancel = threading.Event()
        evaluations.clear()
        with pytest.raises(engine.GenerationCancelled):
            tiny.generate(_image(), "normal", strength=0.5, steps=4, seed=0, cancel=cancel,
                          progress=lambda k, n, el, prev: cancel.set())
        assert evaluations == [] and tiny.pipe.on_latents_ready is None
        assert tiny.pipe.init_latents is None and tiny.pipe.posterior_mean is None  # nothing left on the pipeline
        # without a progress callback nothing changes: the same counterfactuals
        again = tiny.generate(_image(), "normal", strength=0.5, steps=4, seed=0, samples=2)
        np.testing.assert_array_equal(again.counterfactuals, r.counterfactuals)
    finally:
        hook.remove()


@pytest.mark.parametrize("sched", engine.SCHEDULERS)
def test_every_scheduler_runs(tiny, sched):
    r = tiny.generate(_image(), "cardiomegaly", strength=0.75, steps=4, seed=0, scheduler=sched)
    assert r.parameters["scheduler"] == sched and np.isfinite(r.counterfactuals).all()


def test_preview_is_cheap_and_in_range(tiny):
    previews = []
    tiny.generate(_image(), "normal", strength=0.5, steps=4, seed=0,
                  progress=lambda k, n, el, prev: previews.append(prev))
    assert previews[0].shape == (16, 16) and previews[0].min() >= 0 and previews[0].max() <= 1


def test_preview_shows_the_predicted_clean_latent_not_the_noisy_one(tiny):
    """PNDM: x0 = (x - sqrt(1 - a) eps) / sqrt(a) from the sampler's last noise prediction, at the level the step
    reached; a sampler without a stored prediction previews the latent itself."""
    import torch

    tiny.generate(_image(), "normal", strength=0.5, steps=4, seed=0)  # leaves the PNDM scheduler set up
    sched = tiny.pipe.scheduler
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    t = 501
    a = sched.alphas_cumprod[t - stride]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    saved = sched.ets
    try:
        sched.ets = [eps]
        torch.testing.assert_close(tiny.predicted_clean(xt, t), x0, rtol=1e-4, atol=1e-4)
        assert not np.allclose(tiny.preview(tiny.predicted_clean(xt, t)), tiny.preview(xt))
        sched.ets = []
        assert torch.equal(tiny.predicted_clean(xt, t), xt)  # nothing predicted yet: the latent itself
    finally:
        sched.ets = saved


@pytest.mark.parametrize("kwargs,fragment", [
    ({"strength": 0.0}, "strength=0.0"), ({"strength": 1.5}, "strength=1.5"), ({"guidance_scale": 0.5}, "guidance"),
    ({"steps": 0}, "steps=0"), ({"samples": 0}, "samples=0"), ({"scheduler": "foo"}, "scheduler='foo'"),
    ({"steps": 2, "strength": 0.2}, "no denoising step"), ({"seed": -1}, "seed=-1"),
])
def test_bad_parameters_are_refused_with_the_value(tiny, kwargs, fragment):
    with pytest.raises(ValueError, match=None) as e:
        tiny.generate(_image(), "normal", **kwargs)
    assert fragment in str(e.value)


def test_bad_image_refused(tiny):
    with pytest.raises(ValueError, match="within"):
        tiny.generate(np.full((8, 8), 2.0, np.float32), "normal")


def test_record_is_json(tiny):
    r = tiny.generate(_image(), "normal", strength=0.5, steps=4, seed=5)
    rec = json.loads(json.dumps(r.record()))
    assert rec["parameters"]["seed"] == 5 and rec["model_hash"] == tiny.info.model_hash
    assert rec["effective_steps"] == 2 and "torch" in rec["library_versions"]
    assert set(rec["timings_s"]) >= {"text_encoding", "denoising", "vae_decode", "total"}


def test_prompt_embeddings_match_training_encoder(tiny):
    pos, neg = tiny.prompt_embeddings("normal chest x ray", "")
    direct = encode_prompt_embeddings(tiny.pipe.tokenizer, tiny.pipe.text_encoder, ["normal chest x ray", ""])
    np.testing.assert_allclose(pos[0].numpy(), direct[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(neg[0].numpy(), direct[1].numpy(), atol=1e-6)


@pytest.mark.parametrize("setup,fragment", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "model_index.json"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text("{")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"unet": ["diffusers", "X"]}')), "lacks"),
])
def test_malformed_model_folder_is_explained(tmp_path, setup, fragment):
    folder = tmp_path / "m"
    setup(folder)
    with pytest.raises(ModelFolderError, match=fragment):
        engine.CounterfactualEngine(folder, device="cpu")


def test_prompt_changes_the_counterfactual(tiny):
    """The tokenizer really tokenizes (no all-[UNK] prompts), so different prompts condition differently."""
    ids = tiny.pipe.tokenizer("large lung opacity on the left").input_ids
    assert tiny.pipe.tokenizer.unk_token_id not in ids
    img = _image()
    a = tiny.generate(img, "normal chest x ray", strength=0.8, steps=5, seed=0, guidance_scale=7.5)
    b = tiny.generate(img, "large lung opacity on the left", strength=0.8, steps=5, seed=0, guidance_scale=7.5)
    assert np.abs(a.counterfactuals - b.counterfactuals).max() > 1e-5


def test_load_engine_in_short_lived_thread_returns_the_engine_and_leaves_no_thread(tiny_engine, tmp_path,
                                                                                   monkeypatch):
    warmed: list[str] = []
    monkeypatch.setattr(engine.CounterfactualEngine, "warm_up",
                        lambda self: warmed.append(threading.current_thread().name) or 0.0)
    eng = engine.load_engine_in_short_lived_thread(tiny_engine.info.path, device="cpu")
    assert eng.info.model_hash == tiny_engine.info.model_hash and warmed == []
    engine.load_engine_in_short_lived_thread(tiny_engine.info.path, device="cpu", warm_up=True)
    assert warmed == ["vald-md-model-load"]  # warmed up on the loading thread, before it returns
    assert not [t for t in threading.enumerate() if t.name == "vald-md-model-load"]  # the loading thread ended
    # it loads on one OpenMP thread and restores the count: a thread started afterwards gets the usual default
    threads = torch.get_num_threads()
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [threads]
    with pytest.raises(ModelFolderError, match="does not exist"):  # the constructor's error reaches the caller
        engine.load_engine_in_short_lived_thread(tmp_path / "nowhere", device="cpu")


def _stock_and_seeded_latents(folder, dtype: str, samples: int = 2):
    """prepare_latents of the stock diffusers pipeline and of the engine's, same folder, seeds 5, 6."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    eng = engine.CounterfactualEngine(folder, device="cpu", dtype=dtype)
    stock = StableDiffusionImg2ImgPipeline(**eng.pipe.components)
    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    img = eng.pipe.image_processor.preprocess(eng.to_model_tensor(ramp))
    eng.pipe.scheduler.set_timesteps(10)
    t = eng.pipe.scheduler.timesteps[5:6].repeat(samples)

    def draw(pipe):
        gens = [torch.Generator("cpu").manual_seed(s) for s in (5, 6)[:samples]]
        return pipe.prepare_latents(img, t, 1, samples, eng.dtype, eng.device, gens).float()

    return draw(stock), draw(eng.pipe)


def test_random_draws_are_the_stock_pipelines_in_fp32_and_dtype_independent(tiny):
    stock32, seeded32 = _stock_and_seeded_latents(tiny.info.path, "fp32")
    assert (stock32 == seeded32).all()  # float32 records made before the change reproduce bit for bit
    _, seeded16 = _stock_and_seeded_latents(tiny.info.path, "bf16")
    # half precision: the same noise (drawn in float32), so only bf16 rounding (~0.4 %) separates the latents
    assert ((seeded16 - seeded32).abs().mean() / seeded32.abs().mean()).item() < 0.02


def test_half_precision_engine_draws_its_seeded_noise_in_float32(tiny, monkeypatch):
    """torch's CPU generator gives other numbers for bf16/fp16 tensors than for float32 on some builds (torch 2.11):
    every seeded draw of a half-precision run must be a float32 draw, cast afterwards."""
    import torch

    bf16 = engine.CounterfactualEngine(tiny.info.path, device="cpu", dtype="bf16")
    dtypes, real_randn = [], torch.randn

    def spy(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    r = bf16.generate(_image(), "normal chest x-ray", strength=0.5, steps=4, seed=1, samples=2)
    assert r.counterfactuals.shape[0] == 2
    assert len(dtypes) == 4 and set(dtypes) == {torch.float32}  # posterior sample + noise, per sample


# the public names the model folder's move to app.modelfolder / app.provenance took from app.engine (issue 17)
ENGINE_COMPAT_NAMES = ("ModelInfo", "model_hash", "check_model_folder", "read_manifest", "write_model_folder",
                       "assemble_model", "img2img_pipeline_class", "MANIFEST", "WEIGHT_SUFFIXES", "library_versions",
                       "load_in_passing_thread")


@pytest.mark.parametrize("name", ENGINE_COMPAT_NAMES)
def test_old_public_names_still_import_from_the_engine(name):
    from app import modelfolder, provenance

    assert name in engine.__all__
    value = getattr(engine, name)
    new = {"img2img_pipeline_class": modelfolder.seeded_img2img_pipeline_class,
           "library_versions": provenance.library_versions,
           "load_in_passing_thread": engine.load_engine_in_short_lived_thread}
    assert value is new.get(name, getattr(modelfolder, name, None))


def test_every_name_in_the_engines_all_exists():
    assert all(hasattr(engine, name) for name in engine.__all__)
    assert len(set(engine.__all__)) == len(engine.__all__)


def test_a_request_without_a_seed_draws_it_with_draw_seed(tiny, monkeypatch):
    monkeypatch.setattr(engine, "draw_seed", lambda: 1234)
    result = tiny.generate(_image(), "normal chest x ray", strength=0.8, steps=5, seed=None, samples=2)
    assert result.seeds == [1234, 1235] and result.parameters["seed"] == 1234


def test_unet_autocast_runs_only_large_batches_in_bf16_and_hands_back_float32() -> None:
    """Issue 15: on an AMX CPU the UNet joins the bf16 autocast for batches of UNET_AUTOCAST_MIN_BATCH or more
    (8 samples with guidance: 1.48x per step); smaller batches and calls outside a generation stay float32."""
    import torch

    from app.engine import _UNetAutocast

    seen: list[torch.dtype] = []

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, sample: torch.Tensor, t: int, return_dict: bool = False) -> tuple[torch.Tensor]:
            y = self.lin(sample)
            seen.append(y.dtype)
            return (y,)

    net = Net()
    autocast = _UNetAutocast(net, torch.bfloat16, min_batch=4)
    small, large = torch.randn(2, 4), torch.randn(4, 4)
    with autocast.on():
        assert net(small, 0)[0].dtype == torch.float32 and seen[-1] == torch.float32
        out = net(large, 0)[0]
        assert seen[-1] == torch.bfloat16 and out.dtype == torch.float32
    assert net(large, 0)[0].dtype == torch.float32 and seen[-1] == torch.float32  # outside a generation


def test_the_record_names_the_unet_under_autocast_only_for_large_batches(tmp_path) -> None:
    import torch

    from app.engine import UNET_AUTOCAST_MIN_BATCH, CounterfactualEngine, _AutoencoderAutocast, _UNetAutocast
    from tests.tiny_model import write_tiny_model

    engine = CounterfactualEngine(write_tiny_model(tmp_path / "tiny"), device="cpu")  # its own: patched below
    assert engine.compute_record(64)["autocast_components"] == []  # autocast off: float32 everywhere
    # as the constructor sets them up on an AMX CPU (cpu_autocast=True), whatever this CPU has
    engine._vae_autocast = _AutoencoderAutocast(engine.pipe.vae, torch.bfloat16)
    engine._unet_autocast = _UNetAutocast(engine.pipe.unet, torch.bfloat16)
    assert engine.compute_record(2)["autocast_components"] == ["vae"]
    assert engine.compute_record(UNET_AUTOCAST_MIN_BATCH)["autocast_components"] == ["vae", "unet"]
    result = engine.generate(np.full((32, 32), 0.5, np.float32), strength=0.5, guidance_scale=2.0, steps=4,
                             seed=0, samples=UNET_AUTOCAST_MIN_BATCH // 2)
    assert result.compute["autocast_components"] == ["vae", "unet"] and np.isfinite(result.counterfactuals).all()


def test_compile_mode_is_inductors_default_on_the_cpu_and_is_recorded(tiny_engine, tmp_path):
    """On the CPU the small UNet is overhead-bound and max-autotune's GEMM autotuning would take minutes at start-up;
    on CUDA the progress callback between steps rules out CUDA graphs. A compiled UNet rounds differently from eager
    float32, so the record's ``compute`` names the mode (nothing is compiled here: torch compiles at the first call)."""
    from tests.tiny_model import write_tiny_model

    assert engine.compile_mode(torch.device("cpu")) == "default"
    assert engine.compile_mode(torch.device("cuda", 0)) == "max-autotune-no-cudagraphs"
    assert tiny_engine.compute_record()["compiled"] is None
    compiled = engine.CounterfactualEngine(write_tiny_model(tmp_path / "tiny"), device="cpu", compile_unet=True)
    assert compiled.compute_record()["compiled"] == "default"
    assert hasattr(compiled.pipe.unet, "_orig_mod")  # the UNet is torch.compile's wrapper


def test_warm_up_runs_the_default_requests_batch_shape_and_one_sample(tiny_engine, monkeypatch):
    """A compiled UNet compiles once per batch shape: the warm-up makes the healthy preset's samples (the default
    request) and a single sample (the paper's setting), with the preset's sampler, so neither request pays it."""
    calls: list[tuple[int, str]] = []

    def fake_generate_request(self, image, request, **kw):
        assert image.shape == (self.info.image_size, self.info.image_size) and request.steps <= 4
        assert request.guidance_scale == self.info.presets["healthy"]["guidance_scale"]  # CFG on or off: the shape
        calls.append((request.samples, request.scheduler))

    monkeypatch.setattr(engine.CounterfactualEngine, "generate_request", fake_generate_request)
    monkeypatch.setitem(tiny_engine.info.presets, "healthy",
                        {**tiny_engine.info.presets["healthy"], "samples": 3, "scheduler": "dpm++"})
    assert tiny_engine.warm_up() >= 0.0
    assert calls == [(3, "dpm++"), (1, "dpm++")]
    monkeypatch.setitem(tiny_engine.info.presets, "healthy", {**tiny_engine.info.presets["healthy"], "samples": 1})
    calls.clear()
    tiny_engine.warm_up()
    assert calls == [(1, "dpm++")]  # one shape, one generation


@pytest.mark.parametrize(("flags", "fast", "amx"), [({"avx2", "amx_bf16", "avx512_bf16"}, True, True),
                                                   ({"avx2", "avx512_bf16"}, True, False),  # e.g. AMD Zen 4
                                                   ({"avx2", "avx512f"}, False, False), (set(), False, False)])
def test_bf16_autocast_is_for_cpus_with_amx_or_avx512_bf16(monkeypatch, flags, fast, amx):
    """bf16 matrix work is markedly faster with AMX tiles or AVX-512 bf16 dot products (docs/PERFORMANCE.md); the
    engine's cpu_autocast acts on either, and on nothing else (or where the flags are unknown)."""
    from app import engine as engine_mod

    monkeypatch.setattr(engine_mod, "_cpu_flags", lambda: frozenset(flags))
    assert engine_mod.cpu_has_fast_bf16() is fast and engine_mod.cpu_has_amx_bf16() is amx
