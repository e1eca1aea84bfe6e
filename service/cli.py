"""`headstart`: Headstart's HTTP API from the command line.

Commands mirror the API's nouns and verbs (create, list, show, report, predict, delete, add,
versions, alias, export). Human
output goes to stdout, progress and errors to stderr; `--json` prints the API's documents as
the server sent them. Exit status: 0 on success, 1 on an API or connection error (or a training
that failed), 2 on a usage error.

Only click is imported up front, so `headstart --help` is quick; httpx (through
`service.client`) and rich load when a command runs. Nothing here imports TensorFlow, numpy or
Pillow.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from service.client import Client, Document, Event

DEFAULT_URL = "http://localhost:8000"  # NB: the same as service.client.DEFAULT_URL


@dataclass
class Session:
    """What the global options say: where the API is, the key, and the output format."""

    url: str
    key: str | None
    as_json: bool
    _client: Client | None = field(default=None, repr=False)

    def client(self) -> Client:
        if self._client is None:
            from service.client import Client

            self._client = Client(self.url, self.key)
            click.get_current_context().call_on_close(self._client.close)
        return self._client


class _Commands(click.Group):
    """Lists commands in the table's order, and turns client errors into exit status 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as error:
            from service.client import ApiError, ClientError

            if isinstance(error, ApiError):
                fail(f"{error.title} ({error.status}): {error.detail}")
            if isinstance(error, ClientError):
                fail(str(error))
            raise


def fail(message: str) -> None:
    """Prints `headstart: message` to stderr and exits with status 1."""
    click.echo(f"headstart: {message}", err=True)
    raise click.exceptions.Exit(1)


def json_option(command):
    """`--json` on a command too (`headstart list --json` as well as `headstart --json list`)."""
    def set_json(ctx: click.Context, _param, value: bool) -> None:
        if value:
            ctx.find_object(Session).as_json = True

    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=set_json,
                        help="Print the API's JSON document as it came.")(command)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="HEADSTART_URL", default=DEFAULT_URL, show_default=True,
              metavar="URL", help="The service's base URL [env: HEADSTART_URL].")
@click.option("--key", envvar="HEADSTART_API_KEY", metavar="KEY",
              help="API key, sent as a Bearer token [env: HEADSTART_API_KEY].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the API's JSON documents as they came, for scripts.")
@click.version_option(package_name="headstart", prog_name="headstart")
@click.pass_context
def cli(ctx: click.Context, url: str, key: str | None, as_json: bool) -> None:
    """Custom image classifiers on a shared VGG16 backbone, over Headstart's HTTP API.

    \b
      headstart create photos/ --wait        a folder of label folders, or a .zip
      headstart predict clf_… 'test/*.jpg'   labels and scores, one line per file
    """
    ctx.obj = Session(url=url, key=key or None, as_json=as_json)


pass_session = click.make_pass_decorator(Session)


# ---------------------------------------------------------------- commands


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="Display name (default: from the labels).")
@click.option("--options", "options_json", metavar="JSON",
              help='Training options as JSON, e.g. \'{"max_epochs": 50, "augmentation": '
                   '{"views": 8}}\'.')
@click.option("--wait", is_flag=True,
              help="Follow training with progress bars, then print the report's summary.")
@json_option
@pass_session
def create(session: Session, path: Path, name: str | None, options_json: str | None,
           wait: bool) -> None:
    """Create a classifier from a folder or a .zip.

    PATH is a folder of label folders (zipped as it uploads, never whole in memory) or a .zip
    whose top-level folders are the labels.
    """
    options = _parse_options(options_json)
    client = session.client()
    with _progress_view() as view:
        try:
            created = client.create(path, name=name, options=options, on_upload=view.upload)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="PATH") from None
        view.uploaded(created)
        if not wait:
            view.close()
            _print(session, created, _classifier_lines)
            return
        final = client.wait(created["id"], on_event=view.event)
    if final["status"] != "ready":
        if session.as_json:
            click.echo(final.text)
        error = final.get("error") or {}
        fail(f"classifier {final['id']} is {final['status']}"
             + (f": {error.get('title')}: {error.get('detail')}" if error else ""))
    if session.as_json:
        click.echo(final.text)
        return
    click.echo(f"{final['id']} {final['name']}: {final['status']}")
    click.echo("\n".join(_summary_lines(client.report(final["id"]))))


@click.command("list")
@json_option
@pass_session
def list_classifiers(session: Session) -> None:
    """List classifiers, newest first."""
    document = session.client().list()

    def lines(document: Document) -> list[str]:
        rows = [(c["id"], c["name"], c["status"], str(len(c["labels"])),
                 f"{c['metrics']['val_accuracy']:.3f}" if c.get("metrics") else "-",
                 c["created_at"][:19].replace("T", " "))
                for c in document["classifiers"]]
        return _table(("ID", "NAME", "STATUS", "LABELS", "VAL_ACC", "CREATED"), rows) \
            if rows else ["no classifiers"]

    _print(session, document, lines)


@click.command()
@click.argument("classifier_id", metavar="ID")
@json_option
@pass_session
def show(session: Session, classifier_id: str) -> None:
    """Show a classifier: status, labels, dataset, progress, metrics."""
    _print(session, session.client().get(classifier_id), _classifier_lines)


@click.command()
@click.argument("classifier_id", metavar="ID")
@json_option
@pass_session
def report(session: Session, classifier_id: str) -> None:
    """Show the training report: d, m, d/m, scores, calibration, dataset health.

    Validation accuracy, d (trainable parameters), m (training examples), d/m and its
    diagnosis, the best epoch, per-label precision, recall and F1, the confusion matrix, the
    calibration and default threshold, and what the dataset health check found.
    """
    _print(session, session.client().report(classifier_id), _report_lines)


@click.command()
@click.argument("classifier_id", metavar="ID")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--top-k", type=click.IntRange(min=1), help="Labels listed per image.")
@click.option("--threshold", type=click.FloatRange(0, 1),
              help="Reject predictions scoring below this (servers with rejection).")
@click.option("--version", "version", type=click.IntRange(min=1),
              help="Predict with this version (default: production).")
@click.option("--alias", help="Predict with the version this alias names.")
@json_option
@pass_session
def predict(session: Session, classifier_id: str, files: tuple[str, ...], top_k: int | None,
            threshold: float | None, version: int | None, alias: str | None) -> None:
    """Classify images, one line per file.

    FILE may be a file, a folder (its images) or a glob pattern ('photos/*.jpg', expanded here
    for shells that do not); images go 32 to a request.
    """
    from service.client import expand_images

    try:
        images = expand_images(files)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="FILE") from None
    if version is not None and alias is not None:
        raise click.UsageError("give --version or --alias, not both")
    document = session.client().predict(classifier_id, images, top_k=top_k, threshold=threshold,
                                        version=version, alias=alias)

    def lines(document: Document) -> list[str]:
        rows = []
        for image, prediction in zip(images, document["predictions"]):
            label, top = prediction.get("label"), prediction.get("top_k", [])
            shown = label
            if label is None:  # the score is the best label's: name it
                shown = f"not recognised ({prediction.get('reason') or 'rejected'})" + (
                    f", best {top[0]['label']}" if top else "")
            others = ", ".join(f"{entry['label']} {entry['score']:.3f}"
                               for entry in top[1:])
            rows.append((str(image), shown, f"{prediction['score']:.3f}", others))
        return _table(("FILE", "LABEL", "SCORE", "OTHERS"), rows)

    _print(session, document, lines)


@click.command()
@click.argument("classifier_id", metavar="ID")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--limit", type=click.IntRange(1, 1000), help="How many to list (default 20).")
@click.option("--method", type=click.Choice(["margin", "entropy"]),
              help="margin (default): 1 - (p1 - p2) of the two best scores; entropy: of all.")
@json_option
@pass_session
def suggest(session: Session, classifier_id: str, path: Path, limit: int | None,
            method: str | None) -> None:
    """Which unlabeled images to label next, most useful first.

    PATH is a folder of images (any subfolders; zipped as it uploads) or a .zip. Images out of
    distribution come last: they may need a new label, or none.
    """
    try:
        document = session.client().suggest(classifier_id, path, limit=limit, method=method)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="PATH") from None

    def lines(document: Document) -> list[str]:
        rows = [(entry["path"], f"{entry['uncertainty']:.3f}", entry["label"] or "-",
                 f"{entry['score']:.3f}",
                 "out of distribution" if entry.get("out_of_distribution") else "")
                for entry in document["suggestions"]]
        return [f"{len(rows)} of {document['images']} images, by {document['method']}:"] \
            + _table(("PATH", "UNCERTAINTY", "PREDICTED", "SCORE", "NOTE"), rows)

    _print(session, document, lines)


@click.command()
@click.argument("classifier_id", metavar="ID")
@click.option("-y", "--yes", is_flag=True,
              help="Do not ask first (a script's stdin, not a terminal, is never asked).")
@json_option
@pass_session
def delete(session: Session, classifier_id: str, yes: bool) -> None:
    """Delete a classifier and every version, cancelling its training if it runs.

    On a terminal it names the classifier and asks first; there is no undo.
    """
    client = session.client()
    if not yes and sys.stdin.isatty():
        classifier = client.get(classifier_id)
        click.confirm(f"Delete {classifier_id} {classifier['name']} ({classifier['status']}, "
                      f"{len(classifier['labels'])} labels) and every version?", abort=True,
                      err=True)
    client.delete(classifier_id)
    if not session.as_json:  # 204: the API sends no document
        click.echo(f"deleted {classifier_id}")


@click.command()
@click.argument("classifier_id", metavar="ID")
@click.option("--format", "format_", required=True,
              type=click.Choice(["savedmodel", "tflite", "onnx"]),
              help="savedmodel (takes image bytes or pixels), tflite or onnx (take pixels).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the zip (default: the server's file name, here).")
@click.option("--version", "version", type=click.IntRange(min=1),
              help="The version to export (default: the served one).")
@pass_session
def export(session: Session, classifier_id: str, format_: str, output: Path | None,
           version: int | None) -> None:
    """Download a classifier to run elsewhere: the model, labels.json, model-card.json and a
    README, as a zip. Waits while the server builds it."""
    def waiting(seconds: float) -> None:
        click.echo(f"the server is building the {format_} export; checking again in "
                   f"{seconds:g} s", err=True)

    written = session.client().export(classifier_id, format_, output, version=version,
                                      on_wait=waiting)
    click.echo(str(written))


@click.command()
@click.argument("classifier_id", metavar="ID")
@click.argument("path", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--options", "options_json", metavar="JSON",
              help='Training options, plus "base": N, "replace": true, "promote": '
                   '"if_better" | "always" | "never".')
@click.option("--wait", is_flag=True, help="Wait until it has trained; print whether it took "
                                           "production.")
@json_option
@pass_session
def add(session: Session, classifier_id: str, path: Path | None, options_json: str | None,
        wait: bool) -> None:
    """Train a new version with more images.

    PATH (a folder of label folders or a .zip; new labels allowed) is added to the base
    version's images, production's by default; without PATH the version retrains those.
    """
    client = session.client()
    try:
        created = client.add_version(classifier_id, path, options=_parse_options(options_json))
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="PATH") from None
    if not wait:
        _print(session, created, _version_lines)
        return
    click.echo(f"version {created['version']} queued ({created['dataset']['images']} images)",
               err=True)
    shown = {"status": created["status"]}

    def polled(document: Document) -> None:
        if document["status"] != shown["status"]:
            shown["status"] = document["status"]
            click.echo(f"status: {document['status']}", err=True)

    final = client.wait_version(classifier_id, created["version"], on_poll=polled)
    _print(session, final, _version_lines)
    if final["status"] != "ready":
        fail(f"version {final['version']} is {final['status']}")


@click.command()
@click.argument("classifier_id", metavar="ID")
@json_option
@pass_session
def versions(session: Session, classifier_id: str) -> None:
    """List a classifier's versions, newest first, with their aliases."""
    def lines(document: Document) -> list[str]:
        rows = [(str(v["version"]), v["status"], str(v["dataset"]["images"]),
                 str(len(v["labels"])),
                 f"{v['metrics']['val_accuracy']:.3f}" if v.get("metrics") else "-",
                 ",".join(v["aliases"]) or "-", v["created_at"][:19].replace("T", " "))
                for v in document["versions"]]
        return _table(("VERSION", "STATUS", "IMAGES", "LABELS", "VAL_ACC", "ALIASES", "CREATED"),
                      rows)

    _print(session, session.client().versions(classifier_id), lines)


@click.command()
@click.argument("classifier_id", metavar="ID")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@json_option
@pass_session
def alias(session: Session, classifier_id: str, name: str, version: int) -> None:
    """Point alias NAME at VERSION (`production` is what predict uses by default)."""
    document = session.client().alias(classifier_id, name, version)
    _print(session, document, lambda d: [f"{n} -> version {v}" for n, v in d["aliases"].items()])


#: The commands, in the order `headstart --help` lists them. A new one is a click command
#: above, with `@json_option` and `@pass_session`, and a name here.
COMMANDS = [create, list_classifiers, show, report, predict, suggest, delete, add, versions,
            alias, export]
for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """The console script `headstart`."""
    cli.main(args=argv, prog_name="headstart")


# ---------------------------------------------------------------- output


def _print(session: Session, document: Document, lines) -> None:
    click.echo(document.text if session.as_json else "\n".join(lines(document)))


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Plain aligned columns: readable, and easy for grep, cut and awk."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


def _pairs(pairs: list[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in pairs)
    return [f"{name.ljust(width)}  {value}" for name, value in pairs]


def _classifier_lines(classifier: dict[str, Any]) -> list[str]:
    dataset = classifier["dataset"]
    counts = ", ".join(f"{label} {n}" for label, n in dataset["per_label"].items())
    images = f"{dataset['images']} ({counts})"
    if dataset.get("skipped"):
        images += f"; {len(dataset['skipped'])} skipped"
    pairs = [("id", classifier["id"]), ("name", classifier["name"]),
             ("status", _status_text(classifier)), ("labels", ", ".join(classifier["labels"])),
             ("images", images), ("created", classifier["created_at"])]
    if classifier.get("stage"):
        pairs.append(("stage", f"{classifier['stage']} (the served head's training stage)"))
    if classifier.get("progress"):
        pairs.append(("progress", _progress_text(classifier["progress"])))
    if classifier.get("metrics"):
        pairs.append(("metrics", ", ".join(f"{name} {value:.4f}" for name, value
                                           in classifier["metrics"].items())))
    if classifier.get("error"):
        pairs.append(("error", f"{classifier['error']['title']}: {classifier['error']['detail']}"))
    for skipped in dataset.get("skipped", [])[:10]:
        pairs.append(("skipped", f"{skipped['path']}: {skipped['reason']}"))
    return _pairs(pairs)


def _status_text(classifier: dict[str, Any]) -> str:
    """"ready · refining (augmented)" while a ready classifier's run trains a later stage."""
    if not classifier.get("refining"):
        return classifier["status"]
    stage = (classifier.get("progress") or {}).get("training_stage")
    return f"{classifier['status']} · refining" + (f" ({stage})" if stage else "")


def _version_lines(version: dict[str, Any]) -> list[str]:
    dataset = version["dataset"]
    counts = ", ".join(f"{label} {n}" for label, n in dataset["per_label"].items())
    pairs = [("version", str(version["version"])), ("status", version["status"]),
             ("base", str(version["base"]) if version.get("base") else "-"),
             ("images", f"{dataset['images']} ({counts})"),
             ("aliases", ", ".join(version["aliases"]) or "-")]
    if version.get("metrics"):
        pairs.append(("metrics", ", ".join(f"{name} {value:.4f}" for name, value
                                           in version["metrics"].items())))
    promotion = version.get("promotion")
    if promotion:
        pairs.append(("production", ("taken" if promotion["promoted"] else "not taken")
                      + f": {promotion['reason']}"))
    if version.get("error"):
        pairs.append(("error", f"{version['error']['title']}: {version['error']['detail']}"))
    return _pairs(pairs)


def _progress_text(progress: dict[str, Any]) -> str:
    stage = progress.get("stage", "?")
    of = f" [{progress['training_stage']}]" if progress.get("training_stage") else ""
    if progress.get("images_total"):
        return f"{stage}: {progress.get('images_done') or 0}/{progress['images_total']} images{of}"
    if progress.get("epoch"):
        of_max = f"/{progress['max_epochs']}" if progress.get("max_epochs") else ""
        text = f"{stage}: epoch {progress['epoch']}{of_max}"
        if progress.get("candidate"):
            text += f", head {progress['candidate']}"
        if progress.get("val_accuracy") is not None:
            text += f", val_accuracy {progress['val_accuracy']:.3f}"
        return text + of
    return stage + of


def _summary_lines(report: dict[str, Any]) -> list[str]:
    """The report in a few lines: validation accuracy, d, m, d/m and the diagnosis."""
    m = report["m"]
    views = m["train_after_augmentation"] // max(m["train"], 1)
    lines = _pairs([
        ("validation accuracy", f"{report['validation']['accuracy']:.3f} "
                                f"({m['validation']} validation images)"),
        ("d", f"{report['d']} trainable parameters in the head"
              + (" and the fine-tuned blocks" if report.get("fine_tuned") else "")),
        ("m", f"{m['train_after_augmentation']} training examples ({m['train']} images "
              f"x {views} view{'s' if views != 1 else ''})"),
        ("d/m", f"{report['d_over_m']:,.2f}"),
        ("stage", report.get("stage", "augmented")
         + ("" if report.get("final", True) else " (preliminary: still refining)")),
    ] + ([("fine-tuning", report["fine_tuning"]["reason"])]
         if (report.get("fine_tuning") or {}).get("reason") else []))
    return lines + ["diagnosis:"] + [f"  - {note}" for note in report.get("diagnosis", [])]


def _report_lines(report: dict[str, Any]) -> list[str]:
    lines = _summary_lines(report)
    lines += ["", f"best epoch {report['best_epoch']} of {len(report['history'])}"
                  + (", stopped early" if report.get("stopped_early") else "")]
    per_label = report["validation"]["per_label"]
    lines += [""] + _table(("LABEL", "PRECISION", "RECALL", "F1", "SUPPORT"), [
        (label, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}",
         str(s.get("support", ""))) for label, s in per_label.items()])
    labels = report["labels"]
    matrix = report["validation"]["confusion_matrix"]
    lines += ["", "confusion matrix (rows: true label, columns: predicted)"]
    lines += _table(("", *labels), [(label, *map(str, row)) for label, row in zip(labels, matrix)])
    return lines + _trust_lines(report)


def _trust_lines(report: dict[str, Any]) -> list[str]:
    """Calibration, the default threshold and the health findings, with their paths."""
    lines = []
    calibration = report.get("calibration")
    if calibration:
        ood = report.get("ood") or {}
        lines += [""] + _pairs([
            ("calibration", f"temperature {calibration['temperature']:.3f}, ECE "
                            f"{calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}"),
            ("threshold", f"{report.get('threshold') or 0:.3f} (default for predict)"),
            ("out of distribution", f"{ood.get('method')} (threshold {ood['threshold']:.4f})"
                                    if ood.get("enabled") else "not checked")])
    health = report.get("health")
    if not health:
        return lines
    lines += ["", "dataset health:"]
    for group in health["duplicates"]:
        leak = " (train and validation: leakage)" if group["across_split"] else ""
        lines.append(f"  duplicate{leak}: {', '.join(group['paths'])}")
    for pair in health["near_duplicates"]:
        leak = " (train and validation: leakage)" if pair["across_split"] else ""
        lines.append(f"  near duplicate{leak}: {', '.join(pair['paths'])} "
                     f"(similarity {pair['similarity']:.3f})")
    for entry in health["suspected_mislabels"]:
        lines.append(f"  mislabeled?: {entry['path']} is in {entry['given']}, looks like "
                     f"{entry['predicted']} ({entry['confidence']:.2f})")
    balance = health["imbalance"]
    lines.append("  images per label: " + ", ".join(f"{label} {count}" for label, count
                                                    in balance["per_label"].items()))
    lines += [f"  - {warning}" for warning in health["warnings"]] or ["  no problems found"]
    return lines


def _parse_options(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint="--options") from None
    if not isinstance(options, dict):
        raise click.BadParameter("give a JSON object", param_hint="--options")
    return options


# ---------------------------------------------------------------- progress on stderr


def _progress_view():
    """Bars on a terminal; on anything else (CI logs, files) one line per change."""
    return _Bars() if sys.stderr.isatty() else _Lines()


class _Lines:
    """Progress as plain lines on stderr."""

    def __init__(self):
        self._last = ""
        self._upload: tuple[int, int | None] = (0, None)
        self._started = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        pass

    def say(self, text: str) -> None:
        if text != self._last:
            click.echo(text, err=True)
            self._last = text

    def upload(self, sent: int, total: int | None) -> None:
        self._upload = (sent, total)

    def uploaded(self, created: dict[str, Any]) -> None:
        seconds = time.monotonic() - self._started
        self.say(f"uploaded {_size(self._upload[0])} in {seconds:.1f} s: {created['id']} "
                 f"({created['dataset']['images']} images, {created['status']})")

    def event(self, event: Event) -> None:
        if event.kind == "status":
            self.say(f"status: {_status_text(event.data)}")
        elif event.kind == "progress" and event.data.get("stage") != "queued":
            self.say(_progress_text(event.data))  # "queued" already came as the status
        elif event.kind == "done":
            self.say(f"done: {event.data['status']}")


class _Bars(_Lines):
    """Progress bars on stderr (rich): upload, extraction, epochs."""

    def __init__(self):
        super().__init__()
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self._bars = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(),
                              TextColumn("{task.fields[note]}"), console=Console(stderr=True))
        self._tasks: dict[str, int] = {}
        self._fit: str | None = None

    def __enter__(self):
        self._bars.start()
        return self

    def close(self) -> None:
        self._bars.stop()

    def say(self, text: str) -> None:
        if text != self._last:
            self._bars.console.print(text, highlight=False, markup=False)
            self._last = text

    def _task(self, name: str, description: str, total: float | None):
        if name not in self._tasks:
            self._tasks[name] = self._bars.add_task(description, total=total, note="")
        return self._tasks[name]

    def upload(self, sent: int, total: int | None) -> None:
        super().upload(sent, total)
        task = self._task("upload", "uploading (kB)", total and total // 1000)
        self._bars.update(task, completed=sent // 1000)

    def uploaded(self, created: dict[str, Any]) -> None:
        if "upload" in self._tasks:
            task = self._tasks["upload"]
            sent = self._upload[0] // 1000
            self._bars.update(task, total=sent, completed=sent)
        self.say(f"created {created['id']} ({created['dataset']['images']} images)")

    def event(self, event: Event) -> None:
        data = event.data
        if event.kind == "progress" and data.get("images_total"):
            task = self._task("extract", "extracting (images)", data["images_total"])
            self._bars.update(task, completed=data.get("images_done") or 0)
        elif event.kind == "progress" and data.get("epoch"):
            if "extract" in self._tasks:  # extraction is over once training runs
                task = self._tasks["extract"]
                self._bars.update(task, completed=self._bars.tasks[task].total)
            description = f"training head {data['candidate']}" if data.get("candidate") \
                else "training (epochs)"
            task = self._task("epochs", description, data.get("max_epochs"))
            if data.get("candidate") != self._fit:
                self._fit = data.get("candidate")
                self._bars.reset(task, total=data.get("max_epochs"), description=description)
            metrics = data.get("metrics") or {}
            note = f"val_accuracy {metrics['val_accuracy']:.3f}" \
                if metrics.get("val_accuracy") is not None else ""
            self._bars.update(task, completed=data["epoch"], note=note)
        elif event.kind in ("status", "done"):
            super().event(event)


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


if __name__ == "__main__":  # python -m service.cli, where the console script is not installed
    main()
