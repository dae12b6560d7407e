"""The Batch tab: captions for many photos or zip archives with the model chosen at the top, a progress bar,
a table that fills as captions come, and CSV and JSON Lines downloads recording the model and every setting."""

import time
from collections.abc import Iterator, Sequence
from typing import Any

import gradio as gr
import spaces

from blip_app.config import AppConfig
from blip_app.core.settings import Task
from blip_app.errors import BadInputError
from blip_app.tasks.batch import BatchResult
from blip_app.tasks.exports import batch_to_csv, batch_to_jsonl, export_filename, save_text
from blip_app.tasks.service import Service
from blip_app.web.common import (
    PRIVATE,
    STOP,
    Downloads,
    client_key,
    expand_uploads,
    notify,
    session_id,
    split_settings,
    stopped_when_client_leaves,
)
from blip_app.web.ratelimit import RateLimiter
from blip_app.web.widgets import Tab, settings_panel, style_to_preset

BATCH_HEADERS = ["file", "caption", "seconds", "note"]
ROWS_EVERY_S = 0.5  # the Batch table is sent again at most this often for rows that cost no model run


def batch_table(results: Sequence[BatchResult]) -> list[list[Any]]:
    """Rows of the Batch tab's table: file, caption, seconds, note (gradio shows cells as plain text)."""
    return [[r.name, r.caption or "", None if r.seconds is None else round(r.seconds, 2), r.error or ""]
            for r in results]


def batch_summary(results: Sequence[BatchResult], total: int, *, running: bool, stopped: bool = False) -> str:
    """Markdown: how far the batch is and how it went."""
    done = sum(1 for r in results if r.ok)
    skipped = sum(1 for r in results if r.skipped)
    failed = len(results) - done - skipped
    parts = [f"**{done}** of {total} captioned"]
    if failed:
        parts.append(f"{failed} could not be read or captioned")
    if skipped:
        parts.append(f"{skipped} skipped (not images)")
    head = "Working… " if running else ("Stopped: " if stopped else "Done: ")
    return head + ", ".join(parts) + "."


def _captions_filename(model: str, suffix: str) -> str:
    """``captions-<model>-<time>.<suffix>``, like the conversation exports' names."""
    return "captions-" + export_filename(model, suffix).removeprefix("conversation-")



class BatchTab(Tab):
    """The Batch tab and the handlers behind it."""

    def __init__(self, service: Service, config: AppConfig, limiter: RateLimiter, **shared: Any) -> None:
        super().__init__(service, config, limiter, **shared)
        self.max_batch_images = config.max_batch_images
        # batch results: deleted on the uploads' schedule (--delete-uploads-after; 0 keeps them)
        self.downloads = Downloads(keep_s=float(config.delete_uploads_after_s) or None)

    def build(self, model: Any) -> None:
        """Captions for many images with the chosen model: a progress bar, a table, CSV and JSON Lines."""
        gr.Markdown(f"Caption up to {self.max_batch_images} photos at once with the model chosen above: several "
                    "files or zip archives. The downloads record the model and every generation setting.",
                    elem_classes="note")
        files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos, or zip archives of photos",
                        elem_id="batch-files")
        style = gr.Radio([("Short captions", "short"), ("Detailed descriptions", "detailed")], value="short",
                         label="Style")
        with gr.Row():
            run = gr.Button("Caption all", variant="primary", elem_id="batch-run")
            stop = gr.Button("Stop", variant="stop", visible=False, elem_id="batch-stop")
        summary = gr.Markdown("", elem_classes="note", elem_id="batch-summary")
        table = gr.Dataframe(headers=BATCH_HEADERS, datatype=["str", "str", "number", "str"], interactive=False,
                             wrap=True, max_height=420, column_widths=["22%", "50%", "14%", "14%"],
                             label="Captions", elem_id="batch-table")
        with gr.Row():
            csv_file = gr.DownloadButton("⬇ CSV", value=None, interactive=False, size="sm", elem_id="batch-csv")
            jsonl_file = gr.DownloadButton("⬇ JSON Lines", value=None, interactive=False, size="sm",
                                           elem_id="batch-jsonl")
        panel = settings_panel(Task.CAPTION, self.limits)
        style_to_preset(style, panel.controls["preset"])
        outputs = [table, summary, csv_file, jsonl_file, run, stop]
        run.click(spaces.GPU(self.run_batch), [files, model, style], outputs, preprocess=False,
                  inputs_kwargs=panel.controls, show_progress_on=[summary], **PRIVATE)
        stop.click(self.stop_batch, None, None, **STOP)

    def stop_batch(self, request: gr.Request) -> None:
        """Event: stop this session's batch (images not started are dropped)."""
        self.running.stop(session_id(request), "batch")

    def run_batch(self, files: Any, model: str, style: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: caption every uploaded image, the table filling as captions arrive; then the downloads."""
        from blip_app.tasks.batch import caption_many

        session = session_id(request)
        idle = (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Button(visible=True), gr.Button(visible=False))
        try:
            self.limiter.check(client_key(request))
            items, _ = expand_uploads(files, self.image_limits, self.max_batch_images)
            if not items:
                raise BadInputError("Add some photos (or zip archives of photos) to caption first.")
            preset, overrides = split_settings(Task.CAPTION, settings)
            self.service.request(Task.CAPTION, preset=preset, overrides=overrides)  # refuse bad settings now
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            yield idle
            return
        job = self.running.start(session, "batch", stop_running=True)
        cancel = job.cancel
        total = len(items)
        results: list[BatchResult] = []
        off = gr.DownloadButton(value=None, interactive=False)
        yield ([], f"Working… 0 of {total}.", off, off, gr.Button(visible=False), gr.Button(visible=True))
        try:
            with stopped_when_client_leaves(cancel):
                if not any(s.name == model and s.state == "loaded" for s in self.service.models()):
                    progress(0, desc=f"Loading {model}…")
                steps = caption_many(self.service, model, items, preset, overrides, detailed=style == "detailed",
                                     cancel=cancel, progress=lambda done, count, name: progress(
                                         (done, count), desc=f"{done} of {count}", unit="images"))
                shown = time.monotonic()
                for result in steps:
                    results.append(result)
                    # Each view re-sends the whole table: a caption (which took a model run) is shown at once,
                    # rows that cost nothing (skipped files, unreadable images) at most every ROWS_EVERY_S.
                    if result.ok or time.monotonic() - shown >= ROWS_EVERY_S:
                        shown = time.monotonic()
                        yield (batch_table(results), batch_summary(results, total, running=True), gr.skip(),
                               gr.skip(), gr.skip(), gr.skip())
        except Exception as exc:  # noqa: BLE001
            notify(exc)
        finally:
            self.running.finish(session, "batch", job)
        stopped = cancel.is_set() and len(results) < total
        summary = batch_summary(results, total, running=False, stopped=stopped)
        if not results:
            yield (gr.skip(), summary, off, off, gr.Button(visible=True), gr.Button(visible=False))
            return
        try:
            folder = self.downloads.folder()
            csv_path = save_text(batch_to_csv(results), _captions_filename(model, "csv"), folder)
            jsonl_path = save_text(batch_to_jsonl(results), _captions_filename(model, "jsonl"), folder)
            files_out = (gr.DownloadButton(value=str(csv_path), interactive=True),
                         gr.DownloadButton(value=str(jsonl_path), interactive=True))
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            files_out = (off, off)
        yield (batch_table(results), summary, *files_out, gr.Button(visible=True), gr.Button(visible=False))
