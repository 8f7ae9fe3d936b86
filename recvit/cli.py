"""The ``recvit`` command line (also ``python -m recvit``): info, check, flops, params, depthmap, bench, train,
eval."""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
from typing import Optional, Sequence

PAPER_ALPHA_SUMS = (8.21, 6.64)  # supplement eq. 17
PAPER_TABLE1 = {"attention": 8.433, "mlp": 15.256}  # supplement Table 1
MOR_PAPER_GMACS = {"MoR-B/16": 4.1, "ViT-B/16": 17.6}  # MoR-ViT paper, Table 2 "FLOPs (G)"
SCALES = ("tiny", "small", "base")
FAMILIES = ("edge_recvit", "mor_vit")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recvit", description="Recursive ViTs with token-level dynamic depth (Edge-RecViT, MoR-ViT).")
    parser.add_argument("--version", action="version", version=f"recvit {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="versions, device and which backends can run here (and why not)")
    info.set_defaults(handler=_info, parser=info)

    from .check import add_arguments as add_check_arguments, run as run_check

    check = commands.add_parser("check", help="does recvit compute the right thing here? every backend's ops "
                                "and model forward against eager; exits 1 if any check fails")
    check.set_defaults(handler=run_check, parser=check)
    add_check_arguments(check)

    flops = commands.add_parser(
        "flops", help="FLOPs per image by component, as in the Edge-RecViT supplement (section 3); "
        "MoR-ViT too")
    flops.set_defaults(handler=_flops, parser=flops)
    flops.add_argument("--model", default="edge_recvit_base", help="model name (default: %(default)s)")
    flops.add_argument("--img-size", type=_positive_int, default=None,
                       help="input resolution (default: the model's)")
    flops.add_argument("--beta", type=float, default=None,
                       help="MoR-ViT expert choice: fraction of active patch tokens that exit at each step "
                       "(default: the model's, 0.35)")
    profile = flops.add_mutually_exclusive_group()
    profile.add_argument("--alpha-sums", nargs=2, type=float, metavar=("SUM_ALPHA", "SUM_ALPHA_SQ"),
                         default=None, help="depth profile sums (sum alpha_l, sum alpha_l^2) with "
                         "alpha_l = N_l / N0; default: the paper's 8.21 6.64 (MoR-ViT expert choice: the "
                         "profile its beta fixes, no sums accepted)")
    profile.add_argument("--full-depth", action="store_true", help="every token at depth L (EARR disabled)")

    params = commands.add_parser("params", help="parameter counts (the papers' Params column)")
    params.set_defaults(handler=_params, parser=params)
    params.add_argument("--model", default=None,
                        help="one model (default: the three scales of Edge-RecViT and of MoR-ViT)")

    depthmap = commands.add_parser("depthmap", help="draw the per-patch depths (Edge-RecViT's ranker, "
                                   "MoR-ViT's routing) over an image")
    depthmap.set_defaults(handler=_depthmap, parser=depthmap)
    depthmap.add_argument("image", help="image file (PNG, or any format Pillow reads)")
    depthmap.add_argument("-o", "--output", required=True, help="output figure (e.g. out.png)")
    depthmap.add_argument("--model", default=None,
                          help="model name (default: the checkpoint's where it says, else edge_recvit_base)")
    depthmap.add_argument("--checkpoint", default=None,
                          help="weights to load: a `recvit train` run (its output folder, last.pt, or "
                          "model.safetensors beside config.json) or a public Edge-RecViT checkpoint directory "
                          "with config.json, either of which also sets the model; or a weights file for "
                          "--model (default: random initialisation, whose depths mean nothing)")
    depthmap.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")

    commands.add_parser("bench", add_help=False,
                        help="time ours against DeiT and ToMe on this device (arguments go to "
                        "recvit.bench; see recvit bench --help)")
    commands.add_parser("train", add_help=False,
                        help="fine-tune an Edge-RecViT on an ImageFolder, torchrun for DDP (see recvit train --help)")
    commands.add_parser("eval", add_help=False,
                        help="top-1/top-5, mean depth, GFLOPs/image, images/s on an ImageFolder split "
                        "(see recvit eval --help)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _version() -> str:
    from . import __version__

    return __version__


def _quiet_broken_pipe(run):
    """``recvit info | head``: when the reader closes the pipe, stop without a traceback."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        try:
            status = run(*args, **kwargs)
            sys.stdout.flush()  # a block-buffered pipe fails here, not at exit
            return status
        except BrokenPipeError:
            # Python's documented way: point stdout at devnull so the exit flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    return wrapper


@_quiet_broken_pipe
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # `recvit` alone: what it can do, on stdout, exit 0 (asking is not a usage error)
        _build_parser().print_help()
        return 0
    if argv[:1] == ["bench"]:
        from . import bench

        return bench.main(argv[1:]) or 0
    if argv[:1] == ["train"]:
        from .training import train

        return train.main(argv[1:])
    if argv[:1] == ["eval"]:
        from .training import evaluate

        return evaluate.main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.parser)


def _model(sub: argparse.ArgumentParser, name: str, **overrides):
    from .models.registry import create_model, list_models

    if name not in list_models():
        sub.error(f"argument --model: unknown model {name!r}; expected one of {', '.join(list_models())}")
    try:
        return create_model(name, **overrides)
    except (TypeError, ValueError) as error:
        given = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in overrides.items())
        sub.error(f"argument {given}: cannot build {name!r}: {error}")


def _info(args, sub) -> int:
    import torch

    import recvit_kernels as rk

    from . import __version__
    from .bench.settings import module_version

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda: {props.name} (sm_{props.major}{props.minor}), CUDA {torch.version.cuda}"
    else:
        device = "cpu (no CUDA device)"
    print(f"recvit  {__version__}")
    print(f"python  {platform.python_version()}")
    print(f"torch   {torch.__version__}")
    print(f"triton  {module_version('triton') or 'not installed'}")
    print(f"device  {device}")
    status = 0
    if os.environ.get("RECVIT_BACKEND"):
        try:
            chosen = f"-> {rk.resolve_backend(None)}"
        except ValueError as error:
            chosen, status = f"INVALID, every forward will refuse it: {error}", 1
        print(f"RECVIT_BACKEND={os.environ['RECVIT_BACKEND']} {chosen}")
    from .check import backend_status

    print("backends:")
    for name, reason in rk.available_backends().items():
        print(f"  {name:<7} {backend_status(name, reason)}")
    return status


def _flops(args, sub) -> int:
    from .flops import check_alpha_sums, expert_choice_flops, full_depth_flops, profile_flops

    if args.beta is not None:
        _require_beta(sub, args.model)
    overrides = {key: value for key, value in (("img_size", args.img_size), ("beta", args.beta))
                 if value is not None}
    model = _model(sub, args.model, **overrides)
    try:
        full_depth_flops(model)
    except TypeError as error:
        sub.error(f"argument --model: {args.model!r}: the FLOPs accounting needs an Edge-RecViT, MoR-ViT or early-exit DeiT: "
                  f"{str(error).removeprefix('model: ')}")
    num_steps, tokens = model.num_steps, model.num_tokens
    size, dim = model.patch_embed.img_size, model.embed_dim
    ratio = model.recursion.layer_for_step(1).mlp.fc1.out_features / dim
    mor = hasattr(model, "router")
    expert_choice = getattr(model, "routing", None) == "expert_choice"
    if args.full_depth:
        what = f"full depth (every token runs all L = {num_steps} steps)"
        result = full_depth_flops(model)
        if mor:
            what += "; every router scores every token at every step"
    elif expert_choice:
        if args.alpha_sums:
            sub.error(f"argument --alpha-sums: {args.model!r} routes by expert choice, whose depth profile is "
                      f"fixed by N0 and beta (beta = {model.beta:g}); drop --alpha-sums (or use --beta)")
        counts = model.active_counts(tokens)
        alphas = [count / tokens for count in counts]
        result = expert_choice_flops(model, kv="active")
        what = (f"expert choice, beta = {model.beta:g}: active tokens per step N_l = "
                f"{', '.join(map(str, counts))}, fixed by N0 and beta (model.active_counts), the same for "
                f"every image (sum alpha_l = {sum(alphas):.4f}, sum alpha_l^2 = {sum(a * a for a in alphas):.4f})")
    else:
        sums = tuple(args.alpha_sums) if args.alpha_sums else PAPER_ALPHA_SUMS
        try:
            check_alpha_sums(sums, num_steps)
        except ValueError as error:
            sub.error(f"argument --alpha-sums: {str(error).removeprefix('alpha_sums: ')}")
        result = profile_flops(model, sums)
        what = f"depth profile sum alpha_l = {sums[0]:g}, sum alpha_l^2 = {sums[1]:g} (eqs. 16-19)"
    g = result.gflops()
    print(f"{args.model}, {size}x{size} input: N0 = {tokens} tokens, C = {dim}, L = {num_steps}, "
          f"MLP ratio {ratio:g}")
    print(what)
    print("1 MAC = 2 FLOPs; bias, softmax, norms" + (", the router's sigmoid gates" if mor else "")
          + " and the classifier ignored; attention over the active tokens (kv=\"active\").")
    print()
    router = ("Router (MoR)", "ranker", 4) if mor else ("Ranker (EARR)", "ranker", 3)
    rows = [("Patch embedding", "patch_embed", 3), router,
            ("Attention", "attention", 3), ("MLP", "mlp", 3), ("Blocks (attn + MLP)", "blocks", 2),
            ("Total", "total", 2)]
    print(f"{'Component':<21}{'GFLOPs':>9}{'Share':>9}")
    for label, key, digits in rows:
        print(f"{label:<21}{g[key]:>9.{digits}f}{100 * g[key] / g['total']:>8.2f}%")
    print()
    paper_base = args.model == "edge_recvit_base" and size == 224
    if args.full_depth and paper_base:
        print(f"Note: the supplement's eq. 13 gives the blocks as 34.90: that is {g['blocks']:.4f} rounded "
              "twice (34.895 -> 34.90); eq. 14's total 35.60 agrees.")
    elif not args.full_depth and paper_base and sums == PAPER_ALPHA_SUMS:
        # The sums the paper's own attention / MLP split implies (MLP is linear in S1).
        s1 = PAPER_TABLE1["mlp"] * 1e9 / (4.0 * tokens * dim * ratio * dim)
        s2 = (PAPER_TABLE1["attention"] * 1e9 - 8.0 * tokens * dim * dim * s1) / (4.0 * tokens ** 2 * dim)
        print(f"Note: the supplement's Table 1 splits the blocks as attention {PAPER_TABLE1['attention']} / "
              f"MLP {PAPER_TABLE1['mlp']}, with the same total {g['total']:.2f}. That split comes from the "
              "paper's profiler on its own depth histogram, whose sums differ slightly from the quoted "
              f"ones (it implies sum alpha_l ~ {s1:.3f}, sum alpha_l^2 ~ {s2:.2f}); the formulas with the "
              "quoted sums give the split above.")
    elif args.model == "mor_vit_base" and size == 224 and expert_choice and not args.full_depth:
        print(f"Note: the MoR-ViT paper's Table 2 gives {MOR_PAPER_GMACS['MoR-B/16']} G for MoR-B/16 beside "
              f"{MOR_PAPER_GMACS['ViT-B/16']} G for ViT-B/16: those count multiply-adds (ViT-B/16's "
              f"{MOR_PAPER_GMACS['ViT-B/16']} G is its MAC count), so compare total / 2 = {g['total'] / 2:.2f} G "
              f"MACs. The paper states no beta; beta = 0.35 is this model's default.")
    return 0


def _require_beta(sub, name: str) -> None:
    """--beta only for a model with a beta (MoR-ViT's expert choice), checked on a meta-device build."""
    import torch

    from .models.registry import create_model, list_models

    if name not in list_models():
        return  # _model reports the unknown name
    with torch.device("meta"):
        probe = create_model(name)
    if not hasattr(probe, "beta"):
        sub.error(f"argument --beta: {name!r} has no beta: --beta sets MoR-ViT's expert choice (mor_vit_*); an "
                  f"Edge-RecViT's depths come from its ranker (its profile: --alpha-sums or --full-depth)")


def _params(args, sub) -> int:
    import torch

    from .flops import PARAMS_CONVENTION, count_params

    names = [args.model] if args.model else [f"{family}_{scale}" for family in FAMILIES for scale in SCALES]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        models = [_model(sub, name) for name in names]
    print(f"Params convention (the papers' column): {PARAMS_CONVENTION}.")
    print()
    print(f"{'Model':<20}{'Params (M)':>12}{'with head (M)':>15}")
    for name, model in zip(names, models):
        without, with_head = count_params(model) / 1e6, count_params(model, include_head=True) / 1e6
        print(f"{name:<20}{without:>12.1f}{with_head:>15.2f}")
    return 0


def _trained_run(sub, args):
    """The model of the ``recvit train`` run ``--checkpoint`` names, its weights loaded, in eval mode
    (``args.model`` set to the run's); None when ``--checkpoint`` is no such run."""
    from .training.evaluate import build_model, read_run, run_conflicts

    if args.checkpoint is None:
        return None
    try:
        run = read_run(args.checkpoint)
    except Exception:  # torch raises several types for unreadable files: load_checkpoint names the problem
        return None
    if run is None:
        return None
    settings = run.settings
    model = build_model(settings["model"], len(run.classes), settings["img_size"], settings["patch_size"],
                        settings["kv"], None, settings["ranker"])
    conflict = run_conflicts(run, model, {"model": args.model})
    if conflict:
        sub.error(conflict)
    try:
        run.load(model)
    except ValueError as error:
        sub.error(f"argument --checkpoint: {error}")
    args.model = settings["model"]
    return model.eval()


def _depthmap(args, sub) -> int:
    import torch

    from .depthmap import require_matplotlib, depth_heatmap, load_image, plot_depthmap

    try:
        require_matplotlib()
    except ImportError as error:
        sub.error(str(error))
    if not os.path.isfile(args.image):
        sub.error(f"argument image: no such file: {args.image}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        sub.error(f"argument -o/--output: directory does not exist: {out_dir}")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(args.output)[1].lower().lstrip(".")
    if extension not in formats:
        given = f"'.{extension}'" if extension else "(no extension)"
        sub.error(f"argument -o/--output: unknown figure format {given}: expected one of "
                  f"{', '.join('.' + name for name in sorted(formats))}")
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        sub.error(f"argument --checkpoint: no such file or directory: {args.checkpoint}")
    torch.manual_seed(args.seed)
    trained = _trained_run(sub, args)
    public = trained is None and args.checkpoint is not None and os.path.isdir(args.checkpoint)
    if trained is not None:
        model = trained
    elif public:  # a public Edge-RecViT checkpoint directory: config.json + weights
        from .checkpoint import from_pretrained

        try:
            model = from_pretrained(args.checkpoint)
        except (OSError, ValueError) as error:
            sub.error(f"argument --checkpoint: {error}")
        args.model = "public Edge-RecViT"
    else:
        args.model = args.model or "edge_recvit_base"
        model = _model(sub, args.model).eval()
    if not (hasattr(model, "ranker") or hasattr(model, "router")):
        sub.error(f"argument --model: {args.model!r} has no depth ranker or router to draw")
    decides = "ranker" if hasattr(model, "ranker") else "router"
    if args.checkpoint is not None and not public and trained is None:
        from .checkpoint import load_checkpoint, no_source_prefixes

        try:
            loaded = load_checkpoint(model, args.checkpoint)
        except (OSError, ValueError) as error:  # unreadable, mismatched, a shard missing: names the file
            sub.error(f"argument --checkpoint: {error}")
        if any(key.startswith(no_source_prefixes(model)) for key in loaded.missing):
            print(f"note: the checkpoint has no {decides} weights, so the {decides} keeps its random "
                  "initialisation")
    try:
        shown, pixels, (height, width) = load_image(args.image, model.patch_embed.img_size)
    except ValueError as error:
        sub.error(f"argument image: {str(error).removeprefix('image: ')}")
    if height != width:
        side = min(height, width)
        print(f"note: the {width}x{height} image was centre-cropped to {side}x{side} (as for evaluation), "
              f"then resized to {model.patch_embed.img_size}x{model.patch_embed.img_size}")
    embed = model.patch_embed
    covered = embed.grid_size * embed.patch_size
    if covered != embed.img_size:  # the patches leave the last rows and columns unread: not drawn either
        shown = shown[:covered, :covered]
        print(f"note: img_size {embed.img_size} is off the {embed.patch_size}-pixel patch grid: the model reads "
              f"the top-left {covered}x{covered} pixels only, and the figure shows those")
    if decides == "ranker":
        depths = depth_heatmap(model, pixels)[0]
    else:  # MoR-ViT: the depths its routing gives in the forward
        with torch.no_grad():
            depths = model(pixels, return_aux=True).depths[0, 1:]
        depths = depths.reshape(model.patch_embed.grid_size, model.patch_embed.grid_size)
    source = args.checkpoint or f"random init, seed {args.seed}"
    plot_depthmap(shown, depths, args.output, model.num_steps,
                  title=f"{args.model} ({source}): {os.path.basename(args.image)}")
    print(f"wrote {args.output}: {depths.numel()} patches, mean depth {depths.float().mean():.2f} "
          f"of L = {model.num_steps}")
    if args.checkpoint is None:
        print(f"note: no --checkpoint given, so the {decides} is randomly initialised and its depths are noise")
    return 0
