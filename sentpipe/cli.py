"""The `sentpipe` command: parsing and printing only; the work lives in ingress/ and processors/."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from sentpipe.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Sent webhooks into Kafka, deduplicated.")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
db_app = typer.Typer(no_args_is_help=True, help="PostgreSQL schema.")
app.add_typer(topics_app, name="topics")
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)


class CliError(Exception):
    """A failure the user can act on; printed as one line."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "SENTPIPE_" + "_".join(str(p) for p in first["loc"]).upper()
        fail(f"invalid setting {name}: {first['msg']}")


@app.command()
def ingress(
    host: Annotated[str | None, typer.Option(help="Listen address [SENTPIPE_INGRESS_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Webhook port [SENTPIPE_INGRESS_PORT].")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Metrics port [SENTPIPE_INGRESS_METRICS_PORT].")
    ] = None,
) -> None:
    """Serve the webhook endpoint: verify, produce to Kafka, answer once durable."""
    from ingress.server import run
    from sentpipe.logs import configure

    s = settings()
    configure(s.log_level, s.log_json)
    run(s, host or s.ingress_host, port or s.ingress_port, metrics_port or s.ingress_metrics_port)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run the stream processors (Faust worker); extra arguments go to Faust's worker command."""
    import prometheus_client

    from processors.handlers import load_modules
    from processors.worker import check_copartitioning, create_app
    from sentpipe.logs import configure

    s = settings()
    configure(s.log_level, s.log_json)
    check_copartitioning(s)
    load_modules(s.handler_modules)
    prometheus_client.start_http_server(s.worker_metrics_port)
    faust_app = create_app(s)
    argv = list(ctx.args)
    if not any(a in ("-l", "--loglevel") or a.startswith("--loglevel=") for a in argv):
        argv += ["--loglevel", s.log_level.lower()]
    sys.argv = ["sentpipe worker", "worker", *argv]
    faust_app.main()


@topics_app.command("ensure")
def topics_ensure(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 10.0,
) -> None:
    """Create every topic of the design that does not exist yet (idempotent)."""
    from processors.topics import ensure_topics

    s = settings()
    states = ensure_topics(s, timeout=timeout)
    table = Table("topic", "partitions", "state", title=f"topics on {s.kafka_bootstrap}")
    for st in states:
        table.add_row(st.name, str(st.partitions), "created" if st.created else "exists")
    out.print(table)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the SQL migrations that have not been applied yet (idempotent)."""
    from processors.migrate import migrate

    for version, applied in migrate(settings().database_url.get_secret_value()):
        out.print(f"{version}: {'applied' if applied else 'already applied'}")


def _register_sender() -> None:
    from sender.command import send_command, trigger_command

    app.command("send")(send_command)
    app.command("trigger")(trigger_command)


_register_sender()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def run(main: Callable[[], Any]) -> int:
    """Run the CLI with errors as one line on stderr; SENTPIPE_DEBUG=1 shows tracebacks."""
    import psycopg
    from confluent_kafka import KafkaException

    from processors.topics import BrokerUnavailable
    from processors.worker import CopartitioningError

    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except (CliError, BrokerUnavailable, CopartitioningError) as exc:
        err.print(f"error: {exc}", highlight=False, soft_wrap=True)
        return 1
    except psycopg.OperationalError as exc:
        err.print(f"error: database unavailable: {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 1
    except KafkaException as exc:
        err.print(f"error: Kafka: {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 1
    except Exception as exc:
        if os.environ.get("SENTPIPE_DEBUG"):
            raise
        err.print(f"error: {type(exc).__name__}: {_one_line(exc)}", highlight=False, soft_wrap=True)
        return 1
    return 0


def main() -> None:
    sys.exit(run(lambda: app(standalone_mode=False)))
