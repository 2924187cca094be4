"""Generate a video with a diffusers pipeline whose transformer is compiled with the `spattn` backend.

    python examples/generate.py                            # tiny random Wan pipeline, CPU, well under a minute
    python examples/generate.py --model cogvideox --steps 4 --frames 9 --height 128 --width 128
    python examples/generate.py --model-path /path/to/Wan2.1-T2V-1.3B-Diffusers --device cuda --prompt "a cat surfing"
    torchrun --nproc-per-node 2 examples/generate.py --ulysses 2 --model-path /path/to/Wan2.1-T2V-14B-Diffusers

It builds a diffusers `WanPipeline` (`--model hunyuan`: `HunyuanVideoPipeline`, `--model cogvideox`:
`CogVideoXPipeline`), from small random components by default (text encoders, tokenizer, VAE and transformer are
made here, nothing is downloaded) or from a local checkpoint directory (`--model-path`, never the hub), replaces
`pipe.transformer` with `torch.compile(pipe.transformer, backend="spattn")` and runs the whole denoising loop under
`spattn_compile.config(sparsity=..., dense_steps=..., refresh_interval=...)`, with the pipeline's progress bar. It
saves the video to `--output-dir` (mp4 with imageio and imageio-ffmpeg, else a GIF through Pillow), the plot of
`spattn_compile.report()` (a PNG, with matplotlib) and prints the report's table: every attention call of the
transformer, dense or sparse, with its plan's density and estimated recall. The random components make noise, not a
picture: they show the mechanics (which calls go sparse, at which steps, with which cache hits) anywhere. The inner
compiler is Inductor on CUDA and eager on the CPU, where the sparse attention runs as the plain-PyTorch reference;
`--compiler` overrides it.

`--ulysses N` (launched with `torchrun --nproc-per-node N`, one GPU per process) splits every attention over N
processes with diffusers' context parallelism (`transformer.enable_parallelism(config=ContextParallelConfig(
ulysses_degree=N))`): each rank runs the sparse attention over the whole sequence for its N-th of the heads. Before
compiling it applies the two settings README gives against diffusers' own graph breaks (Dynamo skips
`logging.Logger.warning_once`; one uncompiled step fills the context-parallel hooks' caches). Every rank runs the same
pipeline call with the same seed; rank 0 saves the video and the plot, and each rank prints its report (its heads).
diffusers has context-parallel plans for Wan (and not for HunyuanVideo or CogVideoX), so `--ulysses` takes
`--model wan`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import string
import time
from pathlib import Path

import numpy as np
import torch

import spattn_compile
from spattn_compile.testing import zoo

MODELS = ("wan", "hunyuan", "cogvideox")
PIPELINE_CLASSES = {"wan": "WanPipeline", "hunyuan": "HunyuanVideoPipeline", "cogvideox": "CogVideoXPipeline"}
# Frames per second of the saved video: the frame rate each model family generates at.
FPS = {"wan": 16, "hunyuan": 24, "cogvideox": 8}
# Video size (frames, height, width) when none is given: the published checkpoints' usual video, and for the tiny
# random pipelines 33 frames of 256x256, whose latent 9x32x32 patches into 9x16x16 = 2304 video tokens per attention
# call, just above the default min_seq_len (2048) like a real video's, and still well under a minute on a CPU.
CHECKPOINT_VIDEO = {"wan": (81, 480, 832), "hunyuan": (129, 720, 1280), "cogvideox": (49, 480, 720)}
TINY_VIDEO = (33, 256, 256)
TINY_STEPS = 6
# Compile-time settings of the tiny pipelines. The default blocks of 128 tokens would leave their 2304 video tokens
# only 18 blocks to choose from; blocks of 32 (tiles of 16, the smallest allowed) give 72. min_seq_len=0 keeps smaller
# videos (--height 64 ...) sparse as well instead of dense as too short.
TINY_SETTINGS = {"block_size": 32, "min_seq_len": 0}
# Text tokens of the tiny pipelines' prompts (the checkpoints use 226 to 512). The tokenizer is character-level, so
# this is the prompt length in characters (longer prompts are truncated, with a warning from diffusers).
TINY_TEXT_LEN = 96
DEFAULT_PROMPT = "A red panda climbs a snowy pine tree at sunrise, cinematic lighting"


@dataclasses.dataclass
class GenerationResult:
    """What `main` produced: the saved files (None where they could not be written) and the schedule report."""

    video_path: Path
    report_path: Path | None
    report: spattn_compile.ScheduleReport
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="wan", help="pipeline family")
    parser.add_argument("--model-path", type=Path, help="local diffusers pipeline directory (default: tiny random)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--steps", type=int, help=f"denoising steps (default: {TINY_STEPS} tiny, 50 checkpoint)")
    tiny_frames, tiny_height, tiny_width = TINY_VIDEO
    parser.add_argument(
        "--frames", type=int, help=f"video frames (default: {tiny_frames} tiny, else the model's usual)"
    )
    parser.add_argument(
        "--height", type=int, help=f"pixels, a multiple of 16 (default: {tiny_height} tiny, else usual)"
    )
    parser.add_argument("--width", type=int, help=f"pixels, a multiple of 16 (default: {tiny_width} tiny, else usual)")
    parser.add_argument("--sparsity", type=float, default=0.75, help="share of video key blocks each block skips")
    parser.add_argument("--dense-steps", type=int, default=2, help="leading denoising steps that run dense")
    parser.add_argument("--refresh-interval", type=int, default=1, help="steps between recomputations of a plan")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--compiler", choices=("inductor", "eager", "aot_eager"), help="default: inductor on CUDA")
    parser.add_argument("--output-dir", type=Path, default=Path("generate_output"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument(
        "--ulysses", type=int, default=1, help="processes of Ulysses context parallelism (run with torchrun)"
    )
    args = parser.parse_args(argv)
    if args.ulysses < 1:
        parser.error(f"--ulysses must be >= 1, got {args.ulysses}")
    if args.ulysses > 1 and args.model not in ULYSSES_MODELS:
        parser.error(
            f"--ulysses {args.ulysses} with --model {args.model}: diffusers has no context-parallel plan (_cp_plan) "
            f"for it; use --model {' or '.join(ULYSSES_MODELS)}"
        )
    return args


# Families whose diffusers transformer has a context-parallel plan (`_cp_plan`).
ULYSSES_MODELS = ("wan",)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """This process in Ulysses context parallelism: its rank, the number of ranks, and the device it runs on."""

    rank: int
    world_size: int
    device: str


def start_parallel(degree: int, device: str) -> Parallel | None:
    """Join the torchrun group for `--ulysses degree` (None for 1): NCCL with one GPU per process on CUDA, gloo on
    the CPU. Raises SystemExit when the launch does not match."""
    if degree == 1:
        return None
    import os

    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != degree:
        raise SystemExit(
            f"--ulysses {degree} needs {degree} processes: launch with torchrun --nproc-per-node {degree} "
            f"(WORLD_SIZE is {world_size})"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Parallel(dist.get_rank(), world_size, device)


def enable_ulysses(transformer: torch.nn.Module, parallel: Parallel) -> None:
    """diffusers' Ulysses context parallelism over every process of the group, on an explicit device mesh."""
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    heads = transformer.config.num_attention_heads
    if heads % parallel.world_size:
        raise SystemExit(f"--ulysses {parallel.world_size} must divide the model's {heads} attention heads")
    device_type = "cuda" if parallel.device.startswith("cuda") else "cpu"
    mesh = init_device_mesh(device_type, (1, parallel.world_size), mesh_dim_names=("ring", "ulysses"))
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=parallel.world_size, mesh=mesh))


def avoid_diffusers_graph_breaks(warm_up) -> None:
    """README's two settings for compiling a context-parallel diffusers model as one graph: Dynamo skips
    `logging.Logger.warning_once` (which the context-parallel hooks call for inputs they do not split), and one
    uncompiled run (`warm_up()`) fills the hooks' cache of the blocks' signatures, whose first lookup Dynamo cannot
    trace."""
    import logging

    warning_once = getattr(logging.Logger, "warning_once", None)  # added to Logger by transformers
    if warning_once is not None:
        torch._dynamo.config.ignore_logger_methods.add(warning_once)
    with torch.no_grad():
        warm_up()


def char_tokenizer():
    """A lower-case character-level tokenizer made in memory (nothing downloaded): ids 0-3 are <pad>, <unk>, <s>,
    </s>; every encoding ends with </s>, which CLIP's pooling looks for."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable) - set(string.whitespace) - set(string.ascii_uppercase)) + [" "]
    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *characters])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


# Token ids of `char_tokenizer`, for the text encoders' configs.
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def tiny_wan(tokenizer, height: int, width: int, frames: int) -> tuple:
    """WanPipeline with a 2-layer transformer, a 2-layer UMT5 text encoder and a 4-channel Wan VAE."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            **SPECIAL_IDS,
        )
    )
    # The zoo's tiny Wan transformer and VAE: the ones the tests run.
    transformer = WanTransformer3DModel(**zoo.wan_config(num_layers=2))
    vae = zoo.wan_vae()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )
    return pipe, {"max_sequence_length": TINY_TEXT_LEN}


def tiny_hunyuan(tokenizer, height: int, width: int, frames: int) -> tuple:
    """HunyuanVideoPipeline with one dual-stream and one single-stream block, a 2-layer Llama and a 2-layer CLIP text
    encoder (both tokenizers are the character tokenizer) and a small HunyuanVideo VAE."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,  # the pipeline takes the hidden state 2 layers before the last
            num_attention_heads=4,
            **SPECIAL_IDS,
        )
    )
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            **SPECIAL_IDS,
        )
    )
    transformer = HunyuanVideoTransformer3DModel(**zoo.hunyuan_video_config(num_layers=1, num_single_layers=1))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
    )
    # The default prompt template is a long system prompt cropped at a token count of the real Llama tokenizer; the
    # character tokenizer would crop elsewhere, so the tiny pipeline encodes the bare prompt.
    return pipe, {"max_sequence_length": TINY_TEXT_LEN, "prompt_template": {"template": "{}", "crop_start": 0}}


def tiny_cogvideox(tokenizer, height: int, width: int, frames: int) -> tuple:
    """CogVideoXPipeline (1.0 style, rotary embeddings) with a 2-layer transformer, a 2-layer T5 encoder and a small
    CogVideoX VAE."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            **SPECIAL_IDS,
        )
    )
    # sample_* set the rotary embeddings' base grid (the pipeline crops it to the video's): the tiny video's latent.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=width // 8,
        sample_height=height // 8,
        sample_frames=frames,
        patch_size=2,
        max_text_seq_length=TINY_TEXT_LEN,
        use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction")
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return pipe, {"max_sequence_length": TINY_TEXT_LEN}


TINY_BUILDERS = {"wan": tiny_wan, "hunyuan": tiny_hunyuan, "cogvideox": tiny_cogvideox}


def load_pipeline(args: argparse.Namespace, dtype: torch.dtype, video: tuple[int, int, int]) -> tuple:
    """The pipeline (on `args.device`, in `dtype`) and the extra keyword arguments of its call."""
    if args.model_path is not None:
        from diffusers import DiffusionPipeline
        from diffusers.utils import deprecation_utils

        if not args.model_path.is_dir():
            raise SystemExit(f"--model-path {args.model_path} is not a directory (a local diffusers checkpoint)")
        # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); older versions only know
        # `torch_dtype` and would ignore `dtype`.
        dtype_argument = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        try:
            pipe = DiffusionPipeline.from_pretrained(args.model_path, **{dtype_argument: dtype}, local_files_only=True)
        except ValueError as error:
            # Models that keep some modules in float32 (Wan's transformer) load only with low_cpu_mem_usage, which
            # diffusers turns off when accelerate is missing.
            if "low_cpu_mem_usage" in str(error) and importlib.util.find_spec("accelerate") is None:
                raise SystemExit(
                    f"loading {args.model_path} needs accelerate: pip install accelerate ({error})"
                ) from error
            raise
        expected = PIPELINE_CLASSES[args.model]
        if type(pipe).__name__ != expected:
            print(f"note: --model {args.model} expects a {expected}, {args.model_path} holds a {type(pipe).__name__}")
        return pipe.to(args.device), {}
    frames, height, width = video
    # A fixed seed for the weights, so that --seed changes the noise and not the model.
    torch.manual_seed(0)
    pipe, call_kwargs = TINY_BUILDERS[args.model](char_tokenizer(), height, width, frames)
    pipe.to(args.device)
    # Only a real cast: diffusers warns about every cast of modules it would keep in float32.
    return (pipe if dtype == torch.float32 else pipe.to(dtype=dtype)), call_kwargs


def video_tokens(pipe, frames: int, height: int, width: int) -> int:
    """Video tokens in each attention call of the transformer: the latent grid divided by the patch size."""
    config = pipe.transformer.config
    temporal = getattr(pipe, "vae_scale_factor_temporal", 4)
    spatial = getattr(pipe, "vae_scale_factor_spatial", 8)
    patch = config.patch_size
    if isinstance(patch, int):
        patch = (getattr(config, "patch_size_t", None) or 1, patch, patch)
    latent = ((frames - 1) // temporal + 1, height // spatial, width // spatial)
    return math.prod(-(-size // step) for size, step in zip(latent, patch))


def save_video(frames: np.ndarray, path_stem: Path, fps: int) -> Path:
    """Write `frames` (F, H, W, 3) in [0, 1] as `<stem>.mp4` when imageio and imageio-ffmpeg are installed, else as
    `<stem>.gif` through Pillow (which diffusers already needs)."""
    images = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
        import imageio

        path = path_stem.with_suffix(".mp4")
        with imageio.get_writer(path, fps=fps, quality=8) as writer:
            for image in images:
                writer.append_data(image)
        return path
    from PIL import Image

    path = path_stem.with_suffix(".gif")
    print(f"imageio and imageio-ffmpeg are not both installed: saving {path.name} (a GIF) instead of an mp4")
    first, *rest = (Image.fromarray(image) for image in images)
    first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    return path


def save_report_plot(report: spattn_compile.ScheduleReport, path: Path) -> Path | None:
    """`report.plot(path)`, or None with the reason printed when matplotlib is missing or nothing was recorded."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no report plot (pip install matplotlib, or spattn_compile[plot])")
        return None
    if not report.records:
        print("no attention call was recorded: no report plot")
        return None
    report.plot(str(path))
    return path


def main(argv: list[str] | None = None) -> GenerationResult:
    args = parse_args(argv)
    parallel = start_parallel(args.ulysses, args.device)
    if parallel is not None:
        args.device = parallel.device
    tiny = args.model_path is None
    on_cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    compiler = args.compiler or ("inductor" if on_cuda else "eager")
    frames, height, width = (
        value or default
        for value, default in zip(
            (args.frames, args.height, args.width), TINY_VIDEO if tiny else CHECKPOINT_VIDEO[args.model]
        )
    )
    steps = args.steps or (TINY_STEPS if tiny else 50)
    settings = {"sparsity": args.sparsity, "dense_steps": args.dense_steps, "refresh_interval": args.refresh_interval}
    spattn_compile.SparseAttentionConfig(**settings)  # a bad value fails here, naming the field, before the loading

    start = time.perf_counter()
    pipe, call_kwargs = load_pipeline(args, dtype, (frames, height, width))
    source = "tiny random components" if tiny else str(args.model_path)
    print(f"pipeline: {type(pipe).__name__} from {source}, {dtype}, device {args.device}")
    print(f"loaded in {time.perf_counter() - start:.1f} s")

    compile_options = {"compiler": compiler}
    if tiny:
        # Compile options, not run-time settings: min_seq_len is read when the graph is compiled, to decide which
        # calls may go sparse. 0 keeps smaller videos than the default (--height 64 ...) sparse too.
        compile_options.update(TINY_SETTINGS)
        defaults = spattn_compile.SparseAttentionConfig()
        print(
            f"tiny model: compiling with {TINY_SETTINGS} instead of the library defaults (block_size="
            f"{defaults.block_size}, estimator={defaults.estimator}, min_seq_len={defaults.min_seq_len}), for its "
            "short sequences"
        )
    if parallel is not None:
        enable_ulysses(pipe.transformer, parallel)
        warm_up_kwargs = {**call_kwargs, "height": height, "width": width, "num_frames": frames}

        def warm_up() -> None:
            pipe(prompt=args.prompt, num_inference_steps=1, output_type="latent", **warm_up_kwargs)

        avoid_diffusers_graph_breaks(warm_up)
        print(f"rank {parallel.rank} of {parallel.world_size}: Ulysses context parallelism on {parallel.device}")
    pipe.transformer = torch.compile(pipe.transformer, backend="spattn", options=compile_options)
    # Wan 2.2 A14B has a second expert for the low-noise steps. Dynamo shares compiled code, hence the step counter
    # and the plan cache, between instances of one class: with refresh_interval > 1 the second expert's first steps
    # may reuse plans of the first.
    if getattr(pipe, "transformer_2", None) is not None:
        pipe.transformer_2 = torch.compile(pipe.transformer_2, backend="spattn", options=compile_options)

    tokens = video_tokens(pipe, frames, height, width)
    min_seq_len = compile_options.get("min_seq_len", spattn_compile.current_config().min_seq_len)
    print(f"video: {frames} frames of {height}x{width}, {steps} steps -> {tokens} video tokens per attention call")
    if tokens < min_seq_len:
        print(f"warning: min_seq_len={min_seq_len}: attention over {tokens} video tokens (and the text) may stay dense")
    if args.dense_steps >= steps:
        print(f"warning: --dense-steps {args.dense_steps} >= --steps {steps}: every step runs dense attention")
    print(f"settings: {settings}, inner compiler {compiler!r}")
    if compiler == "inductor":
        print("(the first denoising step includes Inductor's compilation)")

    spattn_compile.reset_report()
    start = time.perf_counter()
    with torch.no_grad(), spattn_compile.config(**settings):
        output = pipe(
            prompt=args.prompt,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="np",
            **call_kwargs,
        )
    seconds = time.perf_counter() - start
    print(f"generated in {seconds:.1f} s (compilation included)")

    report = spattn_compile.report()
    if parallel is not None:
        import torch.distributed as dist

        # Each rank's report (its heads), in rank order; the outputs are the same on every rank: rank 0 saves them.
        for rank in range(parallel.world_size):
            if rank == parallel.rank:
                print(f"rank {rank}:\n{report}", flush=True)
            dist.barrier()
        if parallel.rank != 0:
            dist.destroy_process_group()
            return GenerationResult(args.output_dir / args.model, None, report, seconds)
    else:
        print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    video_path = save_video(np.asarray(output.frames[0]), args.output_dir / args.model, FPS[args.model])
    if tiny:
        print("(random weights attend almost uniformly, so the estimated recall stays close to the density)")
    report_path = save_report_plot(report, args.output_dir / f"{args.model}_report.png")
    print(f"video: {video_path}")
    if report_path is not None:
        print(f"report plot: {report_path}")
    if parallel is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return GenerationResult(video_path, report_path, report, seconds)


if __name__ == "__main__":
    main()
