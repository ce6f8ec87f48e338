"""Argument parsing, logging setup and subcommands; the only reader of sys.argv."""

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from . import __version__, errors, logs
from .logs import FORMATS
from .settings import from_environment

log = logging.getLogger("vfs")

SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text):
    """'500G', '1.5T', '1048576' -> bytes."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1] if value and value[-1] in SIZE_UNITS else ""
    try:
        return int(float(value[:-1] if unit else value) * SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500G)") from None


def human(size):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def add_common(parser):
    parser.add_argument("-m", "--manifest", default="models.yaml", help="the manifest (default ./models.yaml)")
    parser.add_argument("--cache-dir", help="block cache directory (default $XDG_CACHE_HOME/lamina-llm-cache)")
    parser.add_argument("--endpoint", help="Hub URL (default $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--frozen", action="store_true",
                        help="refuse to start (exit 2) when models.lock and the manifest disagree")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="text lines, or one JSON object per line (time, level, logger, message, "
                             "model, file, offset)")


def build_parser():
    parser = argparse.ArgumentParser(prog="lamina-llm-cache", description=(
        "Mount the models of models.yaml as read-only files, fetched lazily from the Hugging Face Hub."))
    parser.add_argument("--version", action="version", version=f"lamina-llm-cache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount the manifest's models (foreground unless --background)")
    mount.add_argument("mountpoint", nargs="?", help="default: models/ beside the manifest")
    add_common(mount)
    mount.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    mount.add_argument("--read-ahead-kb", type=int, default=1024, help="kernel read-ahead of the mount")
    mount.add_argument("--max-size", type=parse_size, help="cap the cache at this size (e.g. 500G)")
    mount.add_argument("--block-size", type=parse_size, help="block size of a new cache (default 16M)")
    mount.add_argument("--memory", type=parse_size,
                       help="memory for block buffers, all readers together (default 128M; at least 2 blocks)")
    mount.add_argument("--read-timeout", type=float, help="seconds a stalled transfer is waited for (default 15)")
    mount.add_argument("--max-in-flight", type=int, metavar="N",
                       help="HTTP requests in flight per origin, at most (default 32; fewer when the link says so)")
    mount.add_argument("--read-deadline", type=float,
                       help="seconds within which a read gets its bytes or EIO (default 60)")
    mount.add_argument("--no-passthrough", dest="passthrough", action="store_false", default=None,
                       help="serve every read through the daemon, never by FUSE passthrough")
    mount.add_argument("--no-local-passthrough", dest="local_passthrough", action="store_false", default=None,
                       help="serve local models' files through the daemon, which checks every read against "
                            "the scan (a file changed while open gives EIO, not new bytes)")
    mount.add_argument("--api", metavar="HOST:PORT", help="serve the REST API here (e.g. 127.0.0.1:8765)")
    mount.add_argument("--background", action="store_true", help="return once the mount is ready")
    mount.add_argument("--log-file", help="write the log here (default: stderr)")
    mount.add_argument("--no-keeper", dest="keeper", action="store_false",
                       help="serve in this process, with no keeper parent to restart a daemon that dies "
                            "(docs/DESIGN.md, \"The keeper\")")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--keeper-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--adopt-fd", type=int, help=argparse.SUPPRESS)         # the keeper's: docs/DESIGN.md "Hand-over"
    mount.add_argument("--handover-state", help=argparse.SUPPRESS)
    mount.add_argument("--takeover", action="store_true",
                       help="take the connection over from the daemon serving MOUNTPOINT (what `mount` on a "
                            "live mount point does, and `upgrade`)")

    lock = commands.add_parser("lock", help="write models.lock: every model's commit and files")
    lock.add_argument("names", nargs="*", metavar="NAME", help="with --upgrade: only these models")
    lock.add_argument("--upgrade", action="store_true",
                      help="move locked branches to where they point now (all, or the NAMEs)")
    add_common(lock)

    upgrade = commands.add_parser("upgrade", help="hand a live mount to a daemon of the installed code; readers "
                                  "see a short stall, not an error")
    upgrade.add_argument("mountpoint")
    upgrade.add_argument("--timeout", type=float, default=180.0,
                         help="seconds to wait for the successor to serve (default 180); exit 1 past them")

    unmount = commands.add_parser("unmount", help="unmount a mountpoint; returns once its daemon has exited")
    unmount.add_argument("mountpoint")
    unmount.add_argument("--timeout", type=float, default=30.0,
                         help="seconds to wait for the daemon to exit (default 30); exit 1 past them")
    unmount.add_argument("--lazy", action="store_true",
                         help="detach now even while files are open: the daemon serves them until they are "
                              "closed, then exits; returns at once")

    listing = commands.add_parser("list", help="models, backends, sizes and how much is cached")
    add_common(listing)
    listing.add_argument("--json", action="store_true")

    info = commands.add_parser("info", help="one model's files, commit, content ids and cache state")
    info.add_argument("name")
    add_common(info)
    info.add_argument("--json", action="store_true")

    add = commands.add_parser("add", help="add a model to the manifest")
    add.add_argument("name")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hub repo id, e.g. org/name")
    source.add_argument("--local", metavar="PATH",
                        help="a local directory (a directory model) or file (a single-file model)")
    add.add_argument("--file", help="the repo file for a single-file model (e.g. a .gguf)")
    add.add_argument("--revision", help="branch, tag or commit (default main)")
    add.add_argument("--backend", default="llama.cpp", help="llama.cpp | mlc | vllm | transformers")
    add.add_argument("--include", action="append", default=[], help="glob of files for a directory model")
    add_common(add)

    pull = commands.add_parser("pull", help="fetch models fully and verify them (no mount needed)")
    pull.add_argument("names", nargs="*", metavar="NAME")
    pull.add_argument("--all", action="store_true", help="every model of the manifest")
    add_common(pull)

    verify = commands.add_parser("verify", help="re-hash cached models against their content ids")
    verify.add_argument("names", nargs="*", metavar="NAME")
    add_common(verify)

    gc = commands.add_parser("gc", help="evict least recently used blobs down to a size")
    gc.add_argument("--max-size", type=parse_size, help="target size (without it: drop blobs no model names)")
    add_common(gc)

    # `pin`/`unpin` are the commands' names before "pin" came to mean only revision -> commit.
    for verb, alias, text in (("keep", "pin", "keep a model's blobs out of eviction"),
                              ("unkeep", "unpin", "undo keep")):
        sub = commands.add_parser(verb, aliases=[alias], help=text)
        sub.add_argument("name")
        add_common(sub)

    wait = commands.add_parser("wait", help="wait until models are listed, fully cached or verified "
                                            "(reads the cache directory; no API needed)")
    wait.add_argument("names", nargs="+", metavar="NAME")
    wanted = wait.add_mutually_exclusive_group()
    wanted.add_argument("--cached", dest="want", action="store_const", const="cached",
                        help="every byte of the models' files in the cache")
    wanted.add_argument("--verified", dest="want", action="store_const", const="verified",
                        help="cached and hashed against the content ids")
    wait.add_argument("--timeout", type=float, help="give up after S seconds with exit 1 (default: wait for ever)")
    add_common(wait)

    health = commands.add_parser("health", help="probe a mount from outside the daemon (JSON; exit 0 if healthy)")
    health.add_argument("mountpoint", nargs="?", help="default: models/ beside the manifest")
    health.add_argument("-m", "--manifest", default="models.yaml", help="the manifest (default ./models.yaml)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds a statvfs of the mount may take")

    demo = commands.add_parser("demo", help="mount a generated model from a simulated Hub (no network)")
    demo.add_argument("mountpoint", nargs="?", help="default: a new temporary directory")
    demo.add_argument("-v", "--verbose", action="store_true")
    return parser


def settings_for(args):
    return from_environment(
        endpoint=getattr(args, "endpoint", None), cache_dir=getattr(args, "cache_dir", None),
        max_size=getattr(args, "max_size", None), read_ahead_kb=getattr(args, "read_ahead_kb", None),
        allow_other=getattr(args, "allow_other", None), block_size=getattr(args, "block_size", None),
        memory=getattr(args, "memory", None), max_in_flight=getattr(args, "max_in_flight", None),
        read_timeout=getattr(args, "read_timeout", None), read_deadline=getattr(args, "read_deadline", None),
        frozen=getattr(args, "frozen", None) or None, passthrough=getattr(args, "passthrough", None),
        local_passthrough=getattr(args, "local_passthrough", None))


def load(args):
    from .manifest import load_manifest
    return load_manifest(args.manifest)


def cmd_mount(args):
    if args.background:
        return spawn_background(args)
    mountpoint = Path(args.mountpoint or Path(args.manifest).resolve().parent / "models")
    manifest = load(args)
    from .manifest import refuse_overlap
    refuse_overlap(manifest, mountpoint)
    from .control import live_daemon, refuse_another_cache
    if args.adopt_fd is None and not args.takeover and live_daemon(mountpoint):
        refuse_another_cache(mountpoint, settings_for(args).cache_dir)
        args.takeover = True                        # a live mount of ours: take it over, as upgrade does
        args.argv.append("--takeover")
    if args.keeper and args.keeper_fd is None:     # refused manifests are told at once, not by a child
        from .keeper import keep_mount
        return keep_mount(args.argv, mountpoint, args.ready_fd, settings_for(args))
    from .control import QuietStart, Takeover
    taking_over = args.takeover and args.adopt_fd is None
    quiet_start = QuietStart() if taking_over else None      # the old daemon serves meanwhile
    from . import mount
    from .api import parse_address
    from .assembly import HubPolicy, build_filesystem, open_cache_dir
    from .handover import Session
    api_address = parse_address(args.api) if args.api else None
    settings = settings_for(args)
    session = Session(mountpoint, args.adopt_fd, args.handover_state,
                      Takeover(mountpoint, quiet_start) if taking_over else None)
    claim = session.claim_cache(open_cache_dir(settings))  # noqa: F841 - held till exit
    handed = session.prepare()          # a successor's tree keeps its predecessor's inode numbers
    fs = build_filesystem(settings, manifest, HubPolicy.STORED_FIRST, previous=handed.inodes if handed else None)
    mount.run(fs, mountpoint, on_ready=lambda: report_ready(args, mountpoint), api_address=api_address,
              session=session, argv=args.argv)
    return 0


def report_ready(args, mountpoint):
    if args.keeper_fd is not None:
        from .keeper import tell_keeper
        from .handover import state_dir
        tell_keeper(args.keeper_fd, str(state_dir(mountpoint)))
    ready_fd = args.ready_fd
    if ready_fd is None:
        print(f"lamina-llm-cache: serving {mountpoint} (Ctrl-C to unmount)", file=sys.stderr, flush=True)
        return
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)


def spawn_background(args):
    """Run the mount in a detached child and return once it is ready, or with its error."""
    read_end, write_end = os.pipe()
    argv = [a for a in sys.argv[1:] if a != "--background"] + ["--ready-fd", str(write_end)]
    from .assembly import open_cache_dir
    settings = settings_for(args)
    open_cache_dir(settings)                # refuse a bad cache before forking
    log_file = args.log_file or str(settings.cache_dir / "mount.log")
    if not args.log_file:
        argv += ["--log-file", log_file]
    with open(log_file, "ab") as log_output:
        child = subprocess.Popen([sys.executable, "-m", "vfs"] + argv, pass_fds=(write_end,),
                                 stdin=subprocess.DEVNULL, stdout=log_output, stderr=log_output,
                                 start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.read().decode(errors="replace")
    if answer.startswith("ready"):
        print(f"lamina-llm-cache: mounted (pid {child.pid}, log {log_file})")
        return 0
    code = child.wait()
    print(f"lamina-llm-cache: {answer.strip() or f'mount failed; see {log_file}'}", file=sys.stderr)
    return code or 1


def cmd_lock(args):
    from .resolving import update_lock
    if args.names and not args.upgrade:
        raise errors.UsageError("lock: naming models needs --upgrade (lock alone keeps every locked commit)")
    upgrade = args.names if args.upgrade else None
    path, changed = update_lock(settings_for(args), load(args), upgrade)
    plural = "" if len(changed) == 1 else "s"
    print(f"{path}: {len(changed)} model{plural} changed" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Hand the mount to a successor from the installed code: the keeper starts it, or
    without a keeper the daemon itself (control.py). Exit 0 once it serves and the old
    daemon has exited; 1 with the reason when it could not (the old daemon serves on)."""
    from .control import ask_daemon_to_upgrade
    from .daemons import wait_for_exit
    from .keeper import ask_keeper_to_upgrade
    outcome = ask_keeper_to_upgrade(args.mountpoint, args.timeout)
    if outcome is None:
        outcome = ask_daemon_to_upgrade(args.mountpoint, args.timeout)
        if outcome.get("ok") and not wait_for_exit(outcome["old"], args.timeout):
            outcome = {"ok": False, "error": f"pid {outcome['new']} serves, but the old daemon (pid "
                       f"{outcome['old']}) has not exited"}
    if not outcome.get("ok"):
        print(f"lamina-llm-cache: upgrade of {args.mountpoint} failed: {outcome.get('error')}; "
              "the running daemon serves on", file=sys.stderr)
        return 1
    print(f"lamina-llm-cache: {args.mountpoint} upgraded: pid {outcome.get('old')} handed over to pid "
          f"{outcome.get('new')}")
    return 0


def cmd_unmount(args):
    from . import daemons
    from .mount import unmount
    # A lazy unmount leaves the daemon serving the files still open, so there is no exit to wait for.
    pid = None if args.lazy else daemons.daemon_of(args.mountpoint)
    unmount(Path(args.mountpoint), lazy=args.lazy)
    if pid is not None and not daemons.wait_for_exit(pid, args.timeout):
        print(f"lamina-llm-cache: unmounted {args.mountpoint}, but the daemon (pid {pid}) did not exit "
              f"within {args.timeout:g}s", file=sys.stderr)
        return 1
    return 0


def model_reports(args, names=None, with_files=True, manifest=None):
    """The reports of the models `names` (all for None), resolved from the lock or the stored
    snapshots; the Hub only for what was never resolved, and not resolved if it cannot answer."""
    from .assembly import HubPolicy, open_catalog
    catalog = open_catalog(settings_for(args), manifest or load(args), HubPolicy.IF_REACHABLE)
    return catalog.reports(names, with_files)


def cmd_list(args):
    reports = model_reports(args, with_files=args.json)
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print(f"{'NAME':24} {'BACKEND':10} {'SIZE':>10} {'CACHED':>7}  PATH")
    for model in reports:
        size = human(model["size"]) if model["commit"] or model["local"] else "-"
        share = f"{100 * model['cached_bytes'] / model['size']:.0f}%" if model["size"] else "-"
        share = "local" if model["local"] else share
        print(f"{model['name']:24} {model['backend']:10} {size:>10} {share:>7}  {model['path']}")
    return 0


def cmd_info(args):
    from .passthroughstatus import file_passthrough, local_passthrough, mount_status
    manifest = load(args)
    manifest.get(args.name)      # an unknown name is a usage error
    (data,) = model_reports(args, names={args.name}, manifest=manifest)
    status = mount_status(settings_for(args).cache_dir)     # the mount on this cache, if any
    for f in data["files"]:
        f["passthrough"] = (file_passthrough(status, f["verified"]) if "verified" in f
                            else local_passthrough(status))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if data["local"] is not None:
        return print_local_info(data)
    for key in ("name", "backend", "path", "source", "hf", "revision", "commit"):
        print(f"{key:9} {data[key] if data[key] is not None else '-'}")
    print(f"{'size':9} {human(data['size'])}, {human(data['cached_bytes'])} cached")
    lines = []          # written at once: a repo may have 100k files
    for f in data["files"]:
        state = "verified" if f["verified"] else f"{human(f['cached_bytes'])} cached"
        lines.append(f"  {f['path']}  {human(f['size'])}  {f['content_id'][:19]}…  {state}"
                     f"  passthrough: {f['passthrough']}\n")
    sys.stdout.write("".join(lines))
    return 0


def print_local_info(data):
    for key in ("name", "backend", "path", "source", "local"):
        print(f"{key:9} {data[key]}")
    print(f"{'size':9} {human(data['size'])} in {len(data['files'])} files, read from local disk")
    if data["files"]:
        print(f"{'passthrough':9} {data['files'][0]['passthrough']}")
    for f in data["files"]:
        state = "" if f["readable"] else "  (the daemon cannot read it: EACCES)"
        print(f"  {f['path']}  {human(f['size'])}{state}")
    return 0


def cmd_add(args):
    from .manifest import add_model
    local = None
    if args.local is not None:
        # The manifest wants an absolute path; a directory keeps a trailing '/' to read as one.
        local = os.path.abspath(args.local) + ("/" if os.path.isdir(args.local) else "")
    spec = add_model(args.manifest, args.name, hf=args.hf, local=local, backend=args.backend,
                     file=args.file, revision=args.revision, include=tuple(args.include))
    print(f"added {spec.name}: {spec.path} ({spec.hf or spec.local})")
    return 0


def cmd_pull(args):
    from . import manage
    if not args.names and not args.all:
        raise errors.UsageError("pull: name at least one model, or --all")
    return manage.pull(settings_for(args), load(args), args.names, everything=args.all)


def cmd_verify(args):
    from . import manage
    return manage.verify(settings_for(args), load(args), args.names)


def cmd_gc(args):
    from . import manage
    return manage.gc(settings_for(args), load(args), args.max_size)


def cmd_keep(args):
    from . import manage
    return manage.keep(settings_for(args), load(args), args.name, keep=args.command in ("keep", "pin"))


def cmd_wait(args):
    from .wait import wait
    return wait(settings_for(args), load(args), args.names, args.want or "listed", args.timeout)


def cmd_health(args):
    from .health import MountProbe
    mountpoint = Path(args.mountpoint or Path(args.manifest).resolve().parent / "models")
    health = MountProbe(mountpoint, timeout=args.timeout).check_blocking()
    print(json.dumps(health.as_dict()))
    return 0 if health.ok else 1


def cmd_demo(args):
    from .demo import run_demo
    return run_demo(args.mountpoint)


COMMANDS = {"mount": cmd_mount, "lock": cmd_lock, "unmount": cmd_unmount, "upgrade": cmd_upgrade,
            "list": cmd_list, "info": cmd_info, "add": cmd_add, "pull": cmd_pull, "verify": cmd_verify, "gc": cmd_gc,
            "keep": cmd_keep, "unkeep": cmd_keep, "pin": cmd_keep, "unpin": cmd_keep,
            "wait": cmd_wait, "health": cmd_health, "demo": cmd_demo}


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # the keeper starts its child with them
    logs.setup(getattr(args, "verbose", False), getattr(args, "log_file", None),
               getattr(args, "log_format", "text"), secrets=[from_environment().token])
    try:
        return COMMANDS[args.command](args)
    except errors.LaminaError as exc:
        print(f"lamina-llm-cache: error: {exc}", file=sys.stderr)
        if getattr(args, "ready_fd", None) is not None:
            os.write(args.ready_fd, f"error: {exc}\n".encode())
        return errors.exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
