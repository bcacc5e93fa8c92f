"""`python -m service` (or `vae-serve`): serve the checkpoints in ./checkpoints with uvicorn.

Every Settings field is a flag (`--max-batch-size 32`) and an environment variable (`VAE_MAX_BATCH_SIZE=32`);
flags win over the environment, which wins over the defaults."""

from __future__ import annotations

import argparse
import logging
import types
import typing
from typing import Any

from pydantic import SecretStr, ValidationError

from service.settings import Settings

SECRETS = ("api_key", "admin_key")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(annotation: Any) -> tuple[str, Any]:
    """A Settings annotation -> (argparse style, converter)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        return _kind(args[0])
    if origin is list:
        return "list", str
    if origin is typing.Literal:
        return "choice", args
    if annotation is bool:
        return "bool", None
    if annotation is SecretStr:
        return "value", str
    return "value", annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve VAE checkpoints over HTTP. Each flag can also be set as VAE_<FLAG> in the environment "
        "(e.g. VAE_MODELS_DIR); relative paths resolve against the current directory.",
    )
    for name, field in Settings.model_fields.items():
        style, conv = _kind(field.annotation)
        env = "VAE_" + name.upper()
        default = field.default if name not in SECRETS else None
        help_text = f"{field.description or name} (env {env}; default: {default})"
        if style == "bool":
            parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif style == "list":
            metavar = "ORIGIN" if name == "cors_origins" else "NAME"
            parser.add_argument(_flag(name), nargs="+", default=None, metavar=metavar, help=help_text)
        elif style == "choice":
            parser.add_argument(_flag(name), choices=conv, default=None, help=help_text)
        else:
            parser.add_argument(
                _flag(name), type=conv, default=None, metavar="KEY" if name in SECRETS else None, help=help_text
            )
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SystemExit(f"error: invalid settings: {problems}") from None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from service.main import create_app

    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # uvicorn annotates this as int but waits with asyncio, which takes fractions of a second as well.
        timeout_graceful_shutdown=settings.graceful_shutdown_s,  # type: ignore[arg-type]
        limit_concurrency=settings.max_connections,
    )


if __name__ == "__main__":
    main()
