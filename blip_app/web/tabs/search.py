"""The Search tab: several photos (or a zip of them) and a sentence; the photos ranked by the image-text
matching model, best match first, with the match probability and its words under each."""

import logging
from typing import Any

import gradio as gr
import spaces

from blip_app.errors import BadInputError, BlipAppError, ModelLoadError, UnsupportedCheckpointError
from blip_app.tasks.batch import BatchItem
from blip_app.tasks.service import clean_message
from blip_app.web.common import (
    PRIVATE,
    SEARCH_LIMIT,
    SEARCH_TEXT_CHARS,
    client_key,
    expand_uploads,
    inert,
    notify,
)
from blip_app.web.widgets import Tab

log = logging.getLogger(__name__)


def matching_model_problem(model: str | None, exc: BaseException) -> str:
    """Markdown, in place of the results: Search needs the matching model, which could not be loaded, and the fix.

    The person chose neither that model nor its name (the server's --trust-model did), so the sentence says
    what it is and what the operator can do.
    """
    return (f"**Search is unavailable**: it ranks photos with the image-text matching model "
            f"{inert(model or '(none)')}, set by the server's `--trust-model` option, and that model cannot be "
            f"loaded: {inert(str(exc))}\n\nTo search, start the app with `--trust-model` naming a downloaded "
            "copy or a folder (`python -m blip_app make-tiny DIR` writes a tiny one in DIR/retrieval), or with "
            "`--trust-model none` to hide this tab.")


def search_caption(hit: Any) -> str:
    """A gallery caption: score and words first (a long file name is cut at the end), then the name."""
    return f"{hit.score:.2f} {hit.label} · {hit.name}"


def thumbnail(picture: Any, side: int = 384) -> Any:
    """A small copy of a decoded picture for a gallery."""
    small = picture.copy()
    small.thumbnail((side, side))
    return small



class SearchTab(Tab):
    """The Search tab and the handler behind it."""

    def build(self) -> None:
        """Several images (or a zip), a sentence, the images ranked by how well they match it."""
        gr.Markdown(f"Drop up to {SEARCH_LIMIT} photos (or a zip of them), describe what you are looking for, "
                    "and see them ranked by the image-text matching model. The score under each is the "
                    "probability that the sentence describes the photo.", elem_classes="note")
        files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos, or a zip of photos",
                        elem_id="search-files")
        with gr.Row(equal_height=True):
            query = gr.Textbox(placeholder="a cat asleep on a sofa", show_label=False, scale=5, lines=1,
                               max_length=SEARCH_TEXT_CHARS, elem_id="search-query")
            run = gr.Button("Search", variant="primary", scale=1, min_width=90, elem_id="search-run")
        summary = gr.Markdown("", elem_classes="note", elem_id="search-summary")
        # height "fit-content": gradio's "auto" keeps a 450 px minimum (a blank block under a few results)
        gallery = gr.Gallery(label="Best match first", show_label=False, columns=4, height="fit-content",
                             object_fit="cover", interactive=False, allow_preview=True, buttons=["fullscreen"],
                             elem_id="search-results")
        gr.on([run.click, query.submit], spaces.GPU(self.run_search), [files, query], [gallery, summary],
              preprocess=False, show_progress_on=[gallery], trigger_mode="always_last", **PRIVATE)

    def run_search(self, files: Any, query: str, request: gr.Request,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple[Any, Any]:
        """Event: rank the uploaded images by the query; a gallery with rank, name, label and score."""
        from blip_app.models.retrieval import search

        try:
            self.limiter.check(client_key(request))
            query = clean_message(query, what="search text", max_chars=SEARCH_TEXT_CHARS)
            items, notes = expand_uploads(files, self.image_limits, SEARCH_LIMIT)
            items = [item for item in items if not item.skipped]
            if not items:
                raise BadInputError("Add some photos (or a zip of photos) to search first.")
            thumbnails: dict[int, Any] = {}

            def loader(index: int, item: BatchItem) -> Any:
                def load() -> Any:  # called by search when this image's turn comes: one decoded at a time
                    try:
                        picture = item.load()
                    except BlipAppError as exc:
                        notes.append(f"{item.name}: {exc}")
                        return None
                    thumbnails[index] = thumbnail(picture)
                    return picture
                return load

            progress(0, desc=f"Ranking {len(items)} images…")
            hits = search(self.service, self.trust_model, [loader(i, item) for i, item in enumerate(items)], query,
                          names=[item.name for item in items])
            if not hits:
                raise BadInputError("None of the files could be read as a photo: "
                                    + "; ".join(notes[:3]) + ("…" if len(notes) > 3 else ""))
        except (ModelLoadError, UnsupportedCheckpointError) as exc:  # the matching model nobody chose here
            log.info("Search cannot run: %s", exc)
            return gr.skip(), matching_model_problem(self.trust_model, exc)
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            return gr.skip(), gr.skip()
        gallery = [(thumbnails[hit.index], search_caption(hit)) for hit in hits]
        lines = [f"**{len(hits)}** images ranked for “{inert(query)}”, best match first. Each score is the "
                 "probability that the sentence describes the photo (0.8 or more: very likely; 0.5: likely; "
                 "0.2: uncertain; below: unlikely)."]
        lines += [f"Left out: {inert(note)}" for note in notes[:20]]
        return gallery, "\n\n".join(lines)
