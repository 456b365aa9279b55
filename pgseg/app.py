"""``pgseg-app``: a web page (Gradio) that segments your own photos with free-text class names.

    pgseg-app --checkpoint runs/demo/train --short-side 64          # a run directory: its newest checkpoint
    pgseg-app --checkpoint groupvit.pth --examples photos/          # an official checkpoint, example images
    pgseg-app --prompts runs/mvpseg/prompts.pt                      # learned MVP-SEG prompts

The page takes a photo (upload or example), class names, the background threshold and the template set, and shows
the overlay at the photo's own size, a colour legend, each class's share of the pixels and the final group map.
Gradio is the ``app`` extra (``pip install 'pgseg[app]'``) and is imported only when the app is built.
"""
from __future__ import annotations

import argparse
import html
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import HF_PREFIX, CheckpointError, describe_format, find_latest, load_model
from .eval.inference import preprocess_image
from .eval.protocols import Protocol, get_protocol
from .eval.segmenter import SegmentationResult, Segmenter, load_any_image
from .eval.templates import TEMPLATES
from .eval.visualize import group_map_grid, voc_palette
from .mvpseg import GroupSegDenseBackbone, PromptSegmenter
from .runtime.cli import run_command, setup_logging
from .runtime.precision import bf16_flag_dtype

__all__ = ['main', 'build_app', 'launch_app', 'SegmentEngine', 'AppResult', 'parse_classes', 'legend_html',
           'resolve_checkpoint', 'GRADIO_MISSING']

log = logging.getLogger(__name__)

GRADIO_MISSING = "pgseg-app needs gradio: pip install 'pgseg[app]'"
MAX_CLASSES = 255  # label maps are uint8 and the palette has 256 colours, 0 being background
GROUP_MAP_MAX_SIDE = 1024  # the group map is drawn at the photo's size, its long side capped here
PREVIEW_MAX_SIDE = 1024
OUTPUT_HEIGHT = 360  # pixels on the page; the images themselves keep their size
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
MAX_EXAMPLES = 24


def parse_classes(text: str | None) -> list[str]:
    """Class names separated by commas or new lines; blanks dropped, repeats kept once (the first)."""
    names: list[str] = []
    for part in (text or '').replace('\n', ',').split(','):
        name = ' '.join(part.split())
        if name and name not in names:
            names.append(name)
    return names


def resolve_checkpoint(path: str) -> str:
    """A model as given (pgseg checkpoint directory, official .pth, transformers GroupViT folder, hf-hub:ORG/NAME);
    a training run directory -> its newest checkpoint."""
    if path.startswith(HF_PREFIX):
        return path
    if os.path.isdir(path) and describe_format(path) == 'directory':
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f'{path}: neither a pgseg checkpoint nor a run directory holding ckpt-<step> '
                                  f'checkpoints')
        return latest
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    return path


def legend_html(class_names: Sequence[str], areas: dict[str, float]) -> str:
    """One line per class: its overlay colour (VOC palette, index = label), its name and its share of the pixels.
    Background, when predicted, is left uncoloured in the overlay and shown so here."""
    palette = voc_palette()
    uncoloured_background = bool(class_names) and class_names[0] == 'background'
    items = []
    for k, name in enumerate(class_names):
        r, g, b = palette[3 * k:3 * k + 3]
        fill = ('repeating-linear-gradient(45deg,#fff 0 3px,#bbb 3px 6px)' if k == 0 and uncoloured_background
                else f'rgb({r},{g},{b})')
        items.append(f'<li class="pgseg-legend-item" style="margin:2px 0">'
                     f'<span class="pgseg-swatch" style="display:inline-block;width:1.1em;height:1.1em;'
                     f'vertical-align:middle;margin-right:0.5em;border:1px solid #888;background:{fill}"></span>'
                     f'<span class="pgseg-legend-name">{html.escape(name)}</span> '
                     f'<span class="pgseg-legend-area" style="opacity:0.7">{100 * areas.get(name, 0.0):.1f}%</span>'
                     f'</li>')
    return f'<ul class="pgseg-legend" style="list-style:none;padding:0;margin:0">{"".join(items)}</ul>'


@dataclass
class AppResult:
    """What the page shows for one request; ``ok`` False: ``status`` says what is wrong, the rest is empty."""
    ok: bool
    status: str  # Markdown
    overlay: Image.Image | None = None
    legend: str = ''  # HTML
    areas: list[list] = field(default_factory=list)  # [[class, percent of pixels]] of the classes found, largest first
    groups: Image.Image | None = None
    result: SegmentationResult | None = None

    @classmethod
    def error(cls, message: str) -> AppResult:
        return cls(ok=False, status=f'**Error:** {message}')


class SegmentEngine:
    """The model behind the page: a checkpoint's model under the zero-shot rule (``pgseg.Segmenter``), or learned
    MVP-SEG prompts (``pgseg.PromptSegmenter``: every pixel gets one of the classes, no background rule).

    Requests are served one at a time (the app's segment events share a concurrency limit of 1), so the cached
    segmenter is never used by two threads at once."""

    def __init__(self, model=None, *, prompts: PromptSegmenter | None = None, protocol: Protocol | None = None,
                 device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None):
        if (model is None) == (prompts is None):
            raise ValueError('SegmentEngine needs exactly one of a model and a PromptSegmenter')
        self.model = model.eval() if model is not None else None
        self.prompts = prompts
        self.protocol = protocol or get_protocol('pgseg')
        if prompts is not None:
            self.device = prompts.device
        else:
            self.device = device or next(model.parameters()).device
        self.autocast_dtype = autocast_dtype if prompts is None else prompts.autocast_dtype
        self._segmenter: Segmenter | None = None
        self._segmenter_key: tuple | None = None

    @property
    def uses_prompts(self) -> bool:
        return self.prompts is not None

    @classmethod
    def from_paths(cls, checkpoint: str | None, prompts: str | None, classes: Sequence[str] = (),
                   short_side: int | None = None, device: str | None = None,
                   autocast_dtype: torch.dtype | None = None) -> SegmentEngine:
        """As ``pgseg-segment`` loads them: ``checkpoint`` alone (zero-shot rule), or ``prompts`` with
        ``checkpoint``, if given, as their pgseg backbone. ``short_side``: the inference resolution (windows of
        that size at half stride); None keeps the protocol's (or the prompts file's)."""
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        checkpoint = resolve_checkpoint(checkpoint) if checkpoint else None
        windows = dict(short_side=short_side, crop_size=short_side, stride=short_side // 2 if short_side else None)
        if prompts:
            # the learned prompts are turned to other class names per request (_prompt_segmenter)
            segmenter = PromptSegmenter(prompts, list(classes) or ['object'], checkpoint, device, autocast_dtype,
                                        **windows)
            return cls(prompts=segmenter)
        return cls(load_model(checkpoint).to(device), protocol=get_protocol('pgseg', **windows), device=device,
                   autocast_dtype=autocast_dtype)

    # -------------------------------------------------------------------------------------------- segmentation
    def segmenter(self, names: list[str], bg_thresh: float | None, templates: str):
        if self.prompts is not None:
            return self._prompt_segmenter(names)
        # the class embeddings depend on the names, the templates and whether there is a background class
        key = (tuple(names), bg_thresh is None, templates)
        if self._segmenter_key != key:
            self._segmenter = Segmenter(self.model, names, bg_thresh=bg_thresh, templates=templates,
                                        protocol=self.protocol, device=self.device,
                                        autocast_dtype=self.autocast_dtype)
            self._segmenter_key = key
        self._segmenter.bg_thresh = bg_thresh
        return self._segmenter

    @torch.no_grad()
    def _prompt_segmenter(self, names: list[str]) -> PromptSegmenter:
        """The loaded prompts over other class names: only the class text embeddings change (as
        ``PromptSegmenter.__init__`` computes them), the prompts file and backbone are not read again."""
        seg = self.prompts
        if seg.class_names != names:
            seg.text = seg.learner.class_embeddings(seg.backbone, names)
            seg.class_names = list(names)
        return seg

    def _group_model(self):
        """The GroupViT / PGSeg model whose groups can be drawn: the checkpoint's, or the prompts' pgseg backbone's
        (None for a CLIP backbone)."""
        if self.model is not None:
            return self.model
        backbone = self.prompts.backbone
        return backbone.model if isinstance(backbone, GroupSegDenseBackbone) else None

    @torch.no_grad()
    def group_map(self, image: Image.Image) -> Image.Image | None:
        """The final grouping stage over the whole image (resized as for inference, in one pass as the evaluation
        grids draw it): each patch coloured by the group that wins it, at the photo's size (long side capped)."""
        model = self._group_model()
        if model is None:
            return None
        if self.prompts is not None:
            short_side, long_side = self.prompts.settings.short_side, self.prompts.settings.long_side
        else:
            short_side, long_side = self.protocol.short_side, self.protocol.long_side
        x = preprocess_image(image, short_side, long_side).to(self.device)
        dtype = self.autocast_dtype
        with torch.autocast(device_type=torch.device(self.device).type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            out = model.encode_image(x, with_group_embeds=False)
        if not out.group_maps:
            return None
        scale = min(1.0, GROUP_MAP_MAX_SIDE / max(image.size))
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        grid = group_map_grid(F.interpolate(x, size=(h, w), mode='bilinear', align_corners=False),
                              out.group_maps[-1:], out.grid, max_images=1)
        return grid.crop((0, h, w, 2 * h))  # row 0 is the input, row 1 the final stage's groups

    def run(self, image_path: str | None, classes: str | None, bg_thresh: float | None = 0.9,
            no_background: bool = False, templates: str = 'simple') -> AppResult:
        """One request of the page. Expected problems (no photo, no class names, an unreadable file) come back as
        an :class:`AppResult` with ``ok`` False and the message in ``status``."""
        if not image_path:
            return AppResult.error('upload a photo or pick an example first.')
        names = parse_classes(classes)
        notes = []
        with_background = not (no_background or self.prompts is not None or bg_thresh is None)
        if with_background and 'background' in names:
            names.remove('background')  # the threshold rule's class comes first; a typed one would be listed twice
            notes.append('"background" is the threshold rule\'s class here, not a prompt')
        if not names:
            return AppResult.error('type at least one class name, separated by commas (e.g. `cat, dog, grass`).')
        if len(names) > MAX_CLASSES:
            return AppResult.error(f'{len(names)} class names; at most {MAX_CLASSES} fit the label map.')
        if templates not in TEMPLATES:
            return AppResult.error(f'unknown template set {templates!r}; choose from {", ".join(TEMPLATES)}.')
        start = time.perf_counter()
        segmenter = self.segmenter(names, float(bg_thresh) if with_background else None, templates)
        name = os.path.basename(image_path)
        try:
            result = segmenter(image_path)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).replace(str(image_path), name)
            return AppResult.error(f'cannot read `{name}` as an image ({reason}). Upload a JPEG, PNG, WebP or '
                                   f'another format Pillow opens.')
        groups = self.group_map(result.image)
        if groups is None:
            notes.append('no group map: the backbone is not a GroupViT / PGSeg model with grouping stages')
        # the table: the classes found, largest first (the legend lists every class)
        areas = sorted(([n, round(100 * a, 2)] for n, a in result.areas.items()), key=lambda row: -row[1])
        rule = ('learned MVP-SEG prompts' if self.prompts is not None else
                f'background threshold {float(bg_thresh):.2f}' if with_background else 'no background class')
        status = (f'Segmented `{name}` ({result.image.width}×{result.image.height}) into {len(names)} '
                  f'class{"es" if len(names) > 1 else ""}, {rule}, in {time.perf_counter() - start:.2f} s.')
        if notes:
            status += ' ' + '; '.join(n[0].upper() + n[1:] for n in notes) + '.'
        return AppResult(ok=True, status=status, overlay=result.overlay(), legend=legend_html(result.class_names,
                         result.areas), areas=areas, groups=groups, result=result)


def preview(image_path: str | None) -> tuple[Image.Image | None, str]:
    """The uploaded photo as shown (upright, long side capped) and a status line, or None and the reason."""
    if not image_path:
        return None, ''
    name = os.path.basename(image_path)
    try:
        img = load_any_image(image_path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).replace(str(image_path), name)
        return None, f'**Error:** cannot read `{name}` as an image ({reason}).'
    img.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return img, f'`{name}` loaded. Type class names and press **Segment**.'


def list_examples(folder: str | None) -> list[str]:
    """The image files of ``folder`` (sorted, at most MAX_EXAMPLES); an error for a folder that does not exist."""
    if not folder:
        return []
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'examples folder not found: {folder}')
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(os.path.abspath(folder), f) for f in files[:MAX_EXAMPLES]]


# ------------------------------------------------------------------------------------------------------ the page
def _import_gradio():
    """gradio, with its analytics and update check off (the app must work offline); ImportError with the install
    hint when the ``app`` extra is missing."""
    os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'
    try:
        import gradio
    except ImportError:
        raise ImportError(GRADIO_MISSING) from None
    return gradio


def build_app(source, *, examples: Sequence[str] = (), classes: str = '', bg_thresh: float = 0.9,
              templates: str = 'simple', protocol: Protocol | None = None, title: str = 'pgseg: segment a photo'):
    """The page as a ``gradio.Blocks`` (launch it with :func:`launch_app`). ``source``: a :class:`SegmentEngine`, or
    a GroupViT / PGSeg model (zero-shot rule under ``protocol``, default pgseg's). ``examples``: image paths offered
    as examples; ``classes``, ``bg_thresh``, ``templates``: the controls' initial values."""
    gr = _import_gradio()
    engine = source if isinstance(source, SegmentEngine) else SegmentEngine(source, protocol=protocol)
    prompts = engine.uses_prompts

    def segment(image_path, class_text, threshold, no_background, template_set):
        try:
            res = engine.run(image_path, class_text, threshold, bool(no_background), template_set)
        except Exception as exc:  # noqa: BLE001 - the page reports what went wrong instead of a blank error
            log.exception('segmentation failed')
            res = AppResult.error(f'segmentation failed: {type(exc).__name__}: {exc}')
        if not res.ok:
            gr.Warning(res.status.replace('**Error:** ', ''))
        return res.overlay, res.legend, res.areas, res.groups, res.status

    def show_preview(image_path):
        img, status = preview(image_path)
        if status.startswith('**Error:**'):
            gr.Warning(status.replace('**Error:** ', ''))
        return img, status

    # uploads and outputs are cached on disk by gradio: those older than a day are deleted, checked hourly
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(f'## {html.escape(title)}\nUpload a photo (or pick an example), type the class names to look '
                    'for, separated by commas, and press **Segment**.'
                    + (' *Learned MVP-SEG prompts: every pixel gets one of the classes; name a background class '
                       '(e.g. "sky", "grass") to have one.*' if prompts else ''))
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label='Photo', file_types=['image'], type='filepath', elem_id='pgseg-photo')
                shown = gr.Image(label='Your photo', interactive=False, height=200, elem_id='pgseg-preview')
                class_box = gr.Textbox(label='Classes (comma-separated)', value=classes, lines=2,
                                       placeholder='cat, dog, sofa', elem_id='pgseg-classes')
                threshold = gr.Slider(0.0, 1.0, value=bg_thresh, step=0.01, label='Background threshold',
                                      info='a pixel is background when no class scores above it',
                                      interactive=not prompts, elem_id='pgseg-threshold')
                no_background = gr.Checkbox(value=prompts, label='No background class (every pixel gets a class)',
                                            interactive=not prompts, elem_id='pgseg-no-background')
                template_set = gr.Dropdown(list(TEMPLATES), value=templates, label='Prompt templates',
                                           interactive=not prompts, elem_id='pgseg-templates')
                button = gr.Button('Segment', variant='primary', elem_id='pgseg-segment')
                if examples:
                    gr.Examples([[path] for path in examples], inputs=[photo], label='Examples')
            with gr.Column(scale=2):
                status = gr.Markdown('', elem_id='pgseg-status')
                with gr.Row():
                    overlay = gr.Image(label='Segmentation', type='pil', format='png', interactive=False,
                                       height=OUTPUT_HEIGHT, elem_id='pgseg-overlay')
                    groups = gr.Image(label='Final group map', type='pil', format='png', interactive=False,
                                      height=OUTPUT_HEIGHT, elem_id='pgseg-groups')
                with gr.Row():
                    legend = gr.HTML(label='Legend', elem_id='pgseg-legend')
                    areas = gr.Dataframe(headers=['class', 'area (%)'], datatype=['str', 'number'],
                                         interactive=False, label='Area per class', elem_id='pgseg-areas')
        photo.change(show_preview, inputs=[photo], outputs=[shown, status])
        inputs = [photo, class_box, threshold, no_background, template_set]
        outputs = [overlay, legend, areas, groups, status]
        # one request at a time over both events: they share the engine's cached segmenter
        button.click(segment, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id='segment')
        class_box.submit(segment, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id='segment')
    return app


# the outputs fill their boxes, small ones (the demo's 64-pixel scenes) scaled up
PAGE_CSS = '#pgseg-overlay img, #pgseg-groups img, #pgseg-preview img {width: 100%; height: 100%; object-fit: contain}'


def launch_app(app, host: str = '127.0.0.1', port: int = 7860, share: bool = False,
               prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the page on ``host:port`` (no server-side rendering: no Node.js needed). Blocks until interrupted
    unless ``prevent_thread_lock``; then close it with ``app.close()``."""
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                      ssr_mode=False, show_error=True, quiet=quiet, css=PAGE_CSS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='pgseg-app', description='A web page that segments photos with free-text '
                                     "class names (needs the app extra: pip install 'pgseg[app]').")
    parser.add_argument('--checkpoint', default=None, help='pgseg checkpoint directory, training run directory (its '
                        'newest checkpoint), official .pth, transformers GroupViT folder or hf-hub:ORG/NAME (local '
                        'cache)')
    parser.add_argument('--prompts', default=None, help='learned MVP-SEG prompts (pgseg-prompt-train): every pixel '
                        'gets one of the classes, no background rule; --checkpoint, if given, is the pgseg backbone')
    parser.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: every interface)')
    parser.add_argument('--port', type=int, default=7860)
    parser.add_argument('--examples', default=None, help='folder of images offered as examples')
    parser.add_argument('--share', action='store_true', help="a public gradio.live link (needs the internet)")
    parser.add_argument('--classes', default='', help='the class box\'s initial text, e.g. "cat, dog, sofa"')
    parser.add_argument('--bg-thresh', type=float, default=0.9, help='the background threshold slider\'s initial '
                        'value')
    parser.add_argument('--templates', default='simple', choices=sorted(TEMPLATES), help='initial prompt templates')
    parser.add_argument('--short-side', type=int, default=None, help='inference resolution: short side resized to '
                        'this, windows of this size at half stride (default: the protocol\'s 448, or the prompts '
                        'file\'s; the CPU demo model: 64)')
    parser.add_argument('--bf16', action='store_true', help='bf16 autocast')
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.prompts:
        parser.error('give --checkpoint (zero-shot rule) or --prompts (learned MVP-SEG prompts)')
    if not 0.0 <= args.bg_thresh <= 1.0:
        parser.error(f'--bg-thresh must be within 0..1, got {args.bg_thresh}')
    if args.short_side is not None and args.short_side < 16:
        parser.error(f'--short-side must be at least 16, got {args.short_side}')
    try:
        _import_gradio()
    except ImportError:
        print(GRADIO_MISSING, file=sys.stderr)
        return 2
    setup_logging()

    def body() -> None:
        examples = list_examples(args.examples)
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        engine = SegmentEngine.from_paths(args.checkpoint, args.prompts, parse_classes(args.classes),
                                          args.short_side, device, bf16_flag_dtype(args.bf16, device))
        app = build_app(engine, examples=examples, classes=args.classes, bg_thresh=args.bg_thresh,
                        templates=args.templates)
        log.info('pgseg-app on http://%s:%d (Ctrl-C stops it)', args.host, args.port)
        launch_app(app, args.host, args.port, share=args.share)

    # OSError: the port is taken, or the address cannot be served
    return run_command('pgseg-app', body, (CheckpointError, FileNotFoundError, ValueError, OSError))


if __name__ == '__main__':
    sys.exit(main())
