"""`steermoe serve MODEL [vllm serve options] [steering options]`: vLLM's server, steered.

The steering options (each defined once, in `server.serve_options`) are taken out, checked,
and passed to the API server process in the environment (`server.config`); everything else
goes to `vllm serve` unchanged, plus the served names of the locked endpoints and
`--middleware server.middleware.SteeringMiddleware`.

The admin token never comes from the command line (any user can read a process's arguments):
`--admin-token-file FILE` or the environment variable `STEERMOE_ADMIN_TOKEN`; it reaches the API
server process in that variable. `--admin-token TOKEN` is refused (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from expert_profiles.composition import SEPARATOR, split_names
from expert_profiles.directory import ProfileFileError
from expert_profiles.model_shape import ModelShape, shape_from_hf_config
from expert_profiles.request_steering import (
    PROFILE_DIR_ENV,
    ProfileCache,
    SteeringRequestError,
    default_eps,
    resolve_profiles,
)
from expert_profiles.schema import ProfileMismatchError
from expert_profiles.store import ProfileNotFoundError, ProfileStore
from server import vllm_server_compat as compat
from server.config import (
    ADMIN_TOKEN_ENV,
    CONFIG_ENV,
    LOWERS_SAFETY_TAG,
    ConfigError,
    ServerConfig,
    admin_token_from_env,
    endpoint_guard,
    parse_client_profiles,
    parse_endpoint_client_profiles,
    parse_endpoints,
    read_admin_token_file,
)
from server.serve_options import add_steering_options

logger = logging.getLogger("steermoe.serve")

EPILOG = """Every other option is passed to `vllm serve` (see `vllm serve --help`).

examples:
  steermoe serve allenai/OLMoE-1B-7B-0125-Instruct --profiles ./profiles
  steermoe serve MODEL --profiles ./profiles --endpoint olmoe-safe=safety \\
      --client-profiles safety,concise --admin-token-file /run/secrets/steermoe-admin \\
      --port 8000
  STEERMOE_ADMIN_TOKEN="$(cat token)" steermoe serve MODEL --profiles ./profiles

The admin token is never given on the command line (other users see it in the process list):
use --admin-token-file (a file only the server's user can read) or STEERMOE_ADMIN_TOKEN.
"""

REFUSED_TOKEN_OPTION = (
    "--admin-token is not accepted: a token on the command line is visible to every user in "
    "the process list. Put it in a file readable only by you and pass --admin-token-file "
    f"FILE, or set {ADMIN_TOKEN_ENV}"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steermoe serve", allow_abbrev=False, epilog=EPILOG,
        usage="steermoe serve MODEL [vllm serve options] [steering options]",
        description="Serve MODEL with vLLM's OpenAI-compatible API, steerable per request.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steering = parser.add_argument_group("steering")
    add_steering_options(steering)
    # Only to refuse it with a clear message (and not pass the token on to vLLM).
    steering.add_argument("--admin-token", "--admin_token", dest="refused_admin_token",
                          nargs="?", const="", help=argparse.SUPPRESS)
    passed = parser.add_argument_group("vllm serve options read here (and passed on)")
    passed.add_argument("--model", dest="model_option", help=argparse.SUPPRESS)
    passed.add_argument("--served-model-name", "--served_model_name", nargs="+", metavar="NAME",
                        help="names of the unlocked model (default: MODEL)")
    passed.add_argument("--middleware", action="append", default=[], metavar="PATH",
                        help="more ASGI middleware for vLLM (runs inside the steering layer)")
    return parser


def split_model(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """MODEL given first (as with `vllm serve MODEL`), and the rest."""
    if argv and not argv[0].startswith("-"):
        return argv[0], list(argv[1:])
    return None, list(argv)


def _local_shape(model: str) -> ModelShape | None:
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        return shape_from_hf_config(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _check_endpoint_profile(store: ProfileStore, alias: str, name: str,
                            shape: ModelShape | None, directory: str) -> None:
    try:
        profile = store.get(name)
        if shape is not None:
            profile.check_model(shape)
    except ProfileNotFoundError:
        raise ConfigError(f"--endpoint {alias}: no profile {name!r} in {directory}") from None
    except (ProfileFileError, ProfileMismatchError) as exc:
        # An invalid file (bad JSON, a schema error such as a profile that selects no
        # experts) or a profile for another model: the endpoint could never be served.
        raise ConfigError(f"--endpoint {alias}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--endpoint {alias}: cannot read profile {name!r}: "
                          f"{exc.strerror or exc}") from None


def _check_endpoint_guard(profiles: ProfileCache, alias: str, name: str,
                          shape: ModelShape | None) -> str:
    """The profile of a locked endpoint's guard; ConfigError if the guard cannot be used."""
    try:
        guard = profiles.get_guard(name)
        if shape is not None:
            guard.check_model(shape)
    except (SteeringRequestError, ProfileMismatchError) as exc:
        raise ConfigError(f"--endpoint {alias}: {exc}") from None
    return guard.profile


def check_profiles(config: ServerConfig, model: str) -> None:
    """Fail early on locked endpoints whose profile is missing, broken or for another model."""
    if config.endpoints and config.profiles_dir is None:
        raise ConfigError("--endpoint needs --profiles")
    if config.profiles_dir is None:
        return
    store = ProfileStore(config.profiles_dir)
    shape = _local_shape(model)
    for alias, composed in config.endpoints.items():
        guard = endpoint_guard(composed)
        if guard is not None:
            profile = _check_endpoint_guard(ProfileCache(config.profiles_dir), alias, guard, shape)
            _check_endpoint_profile(store, alias, profile, shape, config.profiles_dir)
            continue
        for name in split_names(composed):
            _check_endpoint_profile(store, alias, name, shape, config.profiles_dir)
        if shape is not None and SEPARATOR in composed:
            try:
                resolve_profiles([store.get(name) for name in split_names(composed)], shape,
                                 default_eps())
            except SteeringRequestError as exc:
                raise ConfigError(f"--endpoint {alias}: {exc}") from None
    for name in config.client_profiles or ():
        try:
            present = store.exists(name)
        except OSError as exc:
            logger.warning("steermoe: cannot check profile %r: %s", name, exc)
            continue
        if not present:
            logger.warning("steermoe: --client-profiles names %r, which is not (yet) in %s",
                           name, config.profiles_dir)
        else:
            try:
                if LOWERS_SAFETY_TAG in store.get(name).tags:
                    logger.warning("steermoe: clients may select %r, tagged %s", name,
                                   LOWERS_SAFETY_TAG)
            except ProfileFileError as exc:
                logger.warning("steermoe: %s", exc)


def steering_config(args: argparse.Namespace, model: str) -> ServerConfig:
    """The checked steering config from parsed steering options (`steermoe serve` and
    `steermoe run-batch` share them)."""
    profiles_dir = None
    given_dir = args.profiles or os.environ.get(PROFILE_DIR_ENV)
    if given_dir:
        directory = Path(given_dir).expanduser().resolve()
        if not directory.is_dir():
            raise ConfigError(f"--profiles {given_dir}: not a directory")
        profiles_dir = str(directory)
    config = ServerConfig(
        profiles_dir=profiles_dir,
        endpoints=parse_endpoints(args.endpoint),
        endpoint_client_profiles=parse_endpoint_client_profiles(args.endpoint_client_profiles),
        base_names=tuple(args.served_model_name or [model]),
        client_profiles=parse_client_profiles(args.client_profiles),
        allow_inline_steering=args.allow_inline_steering,
        allow_routing_capture=args.allow_routing_capture,
        max_request_bytes=args.max_request_bytes,
        audit_log=str(Path(args.audit_log).resolve()) if args.audit_log else None,
    )
    check_profiles(config, model)
    return config


def prepare(argv: Sequence[str]) -> tuple[ServerConfig, list[str], str | None]:
    """(config, `vllm serve` argv, admin token or None) for `steermoe serve` arguments.

    ConfigError for `--admin-token` (a token on the command line) and for an unusable
    `--admin-token-file`."""
    model, rest = split_model(argv)
    args, vllm_args = build_parser().parse_known_args(rest)
    if args.refused_admin_token is not None:
        raise ConfigError(REFUSED_TOKEN_OPTION)
    admin_token = admin_token_source(args.admin_token_file)
    model = model or args.model_option
    if not model:
        raise ConfigError("give the model to serve: steermoe serve MODEL ...")
    config = steering_config(args, model)
    compat.check_serving_setup(vllm_args)
    vllm_argv = compat.vllm_serve_argv(model, vllm_args, config.base_names, args.middleware)
    return config, vllm_argv, admin_token


def admin_token_source(token_file: str | None) -> str | None:
    """The admin token: from `--admin-token-file`, else from the environment, else None."""
    if token_file is None:
        return admin_token_from_env()
    if admin_token_from_env() is not None:
        logger.warning("steermoe: --admin-token-file is given; it replaces %s", ADMIN_TOKEN_ENV)
    return read_admin_token_file(Path(token_file).expanduser())


def serve_main(argv: Sequence[str]) -> int:
    """Entry point of `steermoe serve`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config, vllm_argv, admin_token = prepare(argv)
    except (ConfigError, compat.ServingSetupError) as exc:
        print(f"steermoe serve: error: {exc}", file=sys.stderr)
        return 2
    os.environ[CONFIG_ENV] = config.to_json()
    if config.profiles_dir:
        os.environ[PROFILE_DIR_ENV] = config.profiles_dir
    if admin_token:
        os.environ[ADMIN_TOKEN_ENV] = admin_token
    logger.info("steermoe: serving %s with steering config %s", vllm_argv[1], config.to_json())
    return compat.run_vllm_serve(vllm_argv)
