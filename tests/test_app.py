"""pgseg-app: the page's segment callback (no browser), the command's wiring, and the page in headless Chromium
(selenium): upload a photo, type classes, read back the overlay at the photo's size and the legend."""
from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import pgseg
from pgseg import app as app_mod
from pgseg.app import SegmentEngine, legend_html, parse_classes, resolve_checkpoint
from pgseg.eval.protocols import get_protocol
from pgseg.eval.segmenter import Segmenter
from pgseg.eval.visualize import voc_palette
from tests.helpers import tiny_model_config

SMALL = get_protocol('pgseg', short_side=32, crop_size=32, stride=16)  # the tiny model's resolution: fast
PHOTO_SIZE = (96, 64)  # (width, height): not square, so a transposed output would show


def _photo(path, size=PHOTO_SIZE, seed=0) -> str:
    """A PNG photo: noise with a bright disc and a dark square."""
    w, h = size
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 80 + 60).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    arr[(yy - h // 2) ** 2 + (xx - w // 4) ** 2 < (h // 4) ** 2] = (240, 60, 60)
    arr[h // 4:3 * h // 4, w // 2 + 4:w // 2 + 4 + h // 2] = (20, 30, 200)
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture(scope='module')
def engine():
    torch.manual_seed(0)
    return SegmentEngine(pgseg.build_model(tiny_model_config()), protocol=SMALL)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = pgseg.build_model(tiny_model_config())
    return str(pgseg.save_checkpoint(tmp_path_factory.mktemp('app') / 'ckpt', model, model.cfg))


# ------------------------------------------------------------------------------------------- without a browser
def test_parse_classes():
    assert parse_classes(' circle, square ,,circle\nbig   star ') == ['circle', 'square', 'big star']
    assert parse_classes('  , \n ') == [] and parse_classes(None) == []


def test_segment_callback(engine, tmp_path):
    res = engine.run(_photo(tmp_path / 'photo.png'), 'circle, square', 0.5, False, 'simple')
    assert res.ok, res.status
    assert res.overlay.size == PHOTO_SIZE and res.groups.size == PHOTO_SIZE
    assert res.result.labels.shape == PHOTO_SIZE[::-1]
    assert res.result.class_names == ['background', 'circle', 'square']
    assert sum(res.result.areas.values()) == pytest.approx(1.0)
    assert sum(pct for _, pct in res.areas) == pytest.approx(100.0, abs=0.05)
    assert [pct for _, pct in res.areas] == sorted((pct for _, pct in res.areas), reverse=True)
    assert {name for name, _ in res.areas} == set(res.result.areas)
    for k, name in enumerate(res.result.class_names):
        assert f'<span class="pgseg-legend-name">{name}</span>' in res.legend
        if k:  # the overlay's colour of class k
            assert 'rgb({},{},{})'.format(*voc_palette()[3 * k:3 * k + 3]) in res.legend
    assert '96×64' in res.status and 'threshold 0.50' in res.status


def test_segment_callback_options(engine, tmp_path):
    photo = _photo(tmp_path / 'photo.png')
    res = engine.run(photo, 'circle, square, background', 0.5, True, 'full')
    assert res.ok and res.result.class_names == ['circle', 'square', 'background']  # no rule: a typed class
    res = engine.run(photo, 'background,circle', 0.3, False, 'simple')
    assert res.ok and res.result.class_names == ['background', 'circle'] and 'not a prompt' in res.status


def test_segment_callback_passes_the_threshold(engine, tmp_path, monkeypatch):
    """The slider's value reaches the zero-shot rule on every request; the class embeddings are computed again only
    when the names, the templates or the presence of a background class change."""
    made, used = [], []

    class Spy(Segmenter):
        def __init__(self, *args, **kwargs):
            made.append(kwargs['bg_thresh'])
            super().__init__(*args, **kwargs)

        def __call__(self, image):
            used.append(self.bg_thresh)
            return super().__call__(image)
    monkeypatch.setattr(app_mod, 'Segmenter', Spy)
    fresh = SegmentEngine(engine.model, protocol=SMALL)
    photo = _photo(tmp_path / 'photo.png')
    for thresh, no_bg, classes in ((0.37, False, 'a, b'), (0.8, False, 'a,b'), (0.8, True, 'a, b'), (0.5, False, 'c')):
        assert fresh.run(photo, classes, thresh, no_bg).ok
    assert used == [0.37, 0.8, None, 0.5] and made == [0.37, None, 0.5]


def test_segment_callback_errors(engine, tmp_path):
    photo = _photo(tmp_path / 'photo.png')
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    for res, expected in ((engine.run(str(tmp_path / 'broken.png'), 'circle', 0.5), 'cannot read `broken.png`'),
                          (engine.run(photo, '  ,  ', 0.5), 'type at least one class name'),
                          (engine.run(photo, '', 0.5), 'type at least one class name'),
                          (engine.run(None, 'circle', 0.5), 'upload a photo'),
                          (engine.run(photo, 'circle', 0.5, templates='nope'), 'unknown template set')):
        assert not res.ok and res.status.startswith('**Error:**') and expected in res.status, res.status
        assert res.overlay is None and res.legend == '' and res.areas == []
    assert str(tmp_path) not in engine.run(str(tmp_path / 'broken.png'), 'circle', 0.5).status  # name only


def test_prompts_engine(tiny_checkpoint, tmp_path):
    """Learned MVP-SEG prompts on a pgseg backbone: no background rule, other class names per request, and the
    backbone's group map."""
    from pgseg.mvpseg import BackboneConfig, MultiViewPrompts, PromptConfig, build_backbone, save_prompts
    cfg = BackboneConfig(kind='pgseg', checkpoint=tiny_checkpoint)
    learner = MultiViewPrompts(PromptConfig(num_views=2, context_length=4, init=None), build_backbone(cfg))
    save_prompts(str(tmp_path / 'prompts.pt'), learner, cfg,
                 {'slide': {'short_side': 32, 'crop_size': 32, 'stride': 16}})
    engine = SegmentEngine.from_paths(None, str(tmp_path / 'prompts.pt'), ['circle'], device='cpu')
    photo = _photo(tmp_path / 'photo.png')
    first = engine.run(photo, 'circle, square', 0.9, False)
    assert first.ok and first.result.class_names == ['circle', 'square'] and 'MVP-SEG' in first.status
    assert first.overlay.size == PHOTO_SIZE and first.groups.size == PHOTO_SIZE
    again = engine.run(photo, 'square, circle, star', 0.9, False)
    assert again.result.class_names == ['square', 'circle', 'star']
    assert sum(again.result.areas.values()) == pytest.approx(1.0)
    # the same embeddings as a PromptSegmenter built for these names
    direct = pgseg.PromptSegmenter(str(tmp_path / 'prompts.pt'), ['square', 'circle', 'star'], device='cpu')
    assert torch.allclose(engine.prompts.text, direct.text)
    assert np.array_equal(again.result.labels, direct(photo).labels)


def test_legend_html_escapes_names():
    text = legend_html(['background', '<b>cat</b>'], {'<b>cat</b>': 0.25})
    assert '&lt;b&gt;cat&lt;/b&gt;' in text and '<b>' not in text and '25.0%' in text


def test_resolve_checkpoint(tiny_checkpoint, tmp_path):
    run = tmp_path / 'run'
    for step in (5, 12):
        shutil.copytree(tiny_checkpoint, run / f'ckpt-{step:08d}')
    assert resolve_checkpoint(str(run)) == str(run / 'ckpt-00000012')
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    assert resolve_checkpoint('hf-hub:org/name') == 'hf-hub:org/name'  # the cache is looked up when loading
    with pytest.raises(pgseg.checkpoint.CheckpointError, match='neither'):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / 'missing.pth'))


def test_main_wiring(tiny_checkpoint, tmp_path, monkeypatch):
    """The command loads a run directory's newest checkpoint and hands the built page to launch_app."""
    pytest.importorskip('gradio', reason="the app extra (pip install 'pgseg[app]') is not installed")
    run = tmp_path / 'run'
    shutil.copytree(tiny_checkpoint, run / 'ckpt-00000007')
    examples = tmp_path / 'examples'
    examples.mkdir()
    _photo(examples / 'a.png')
    (examples / 'notes.txt').write_text('not an example')
    seen = {}

    def fake_launch(app, host, port, share=False, **_):
        seen.update(app=app, host=host, port=port, share=share)
    monkeypatch.setattr(app_mod, 'launch_app', fake_launch)
    built = {}
    real_build = app_mod.build_app

    def spy_build(engine, **kwargs):
        built.update(engine=engine, **kwargs)
        return real_build(engine, **kwargs)
    monkeypatch.setattr(app_mod, 'build_app', spy_build)
    assert app_mod.main(['--checkpoint', str(run), '--port', '7999', '--examples', str(examples), '--classes',
                         'circle, square', '--short-side', '32']) == 0
    assert seen['host'] == '127.0.0.1' and seen['port'] == 7999 and not seen['share']
    assert [os.path.basename(p) for p in built['examples']] == ['a.png']
    engine = built['engine']
    assert engine.protocol.short_side == 32 and engine.protocol.crop_size == 32 and engine.protocol.stride == 16
    seen['app'].close()


def test_main_errors(tmp_path, monkeypatch, capsys):
    pytest.importorskip('gradio', reason="the app extra (pip install 'pgseg[app]') is not installed")
    assert app_mod.main(['--checkpoint', str(tmp_path / 'missing')]) == 2
    assert 'pgseg-app: error: checkpoint not found' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app_mod.main([])  # neither --checkpoint nor --prompts


def test_missing_gradio(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'gradio', None)  # import gradio -> ImportError
    assert app_mod.main(['--checkpoint', 'x']) == 2
    assert capsys.readouterr().err.strip() == "pgseg-app needs gradio: pip install 'pgseg[app]'"
    with pytest.raises(ImportError, match=r"pip install 'pgseg\[app\]'"):
        app_mod.build_app(None)


# ---------------------------------------------------------------------------------------------- in a browser
def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths. Missing ones are installed with apt-get (Debian's chromium and
    chromium-driver) when running as root; otherwise, or when that fails, the test is skipped with the reason."""
    def which() -> tuple[str | None, str | None]:
        return (shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome'),
                shutil.which('chromedriver'))
    chromium, driver = which()
    if chromium and driver:
        return chromium, driver
    if not (hasattr(os, 'geteuid') and os.geteuid() == 0 and shutil.which('apt-get')):
        pytest.skip('no chromium + chromedriver on PATH, and no apt-get as root to install them '
                    '(Debian: apt-get install chromium chromium-driver)')
    env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
    install = ['apt-get', 'install', '-y', '--no-install-recommends', 'chromium', 'chromium-driver']
    errors = []
    for commands in ([install], [['apt-get', 'update'], install]):  # the package lists may be empty at first
        try:
            for cmd in commands:
                subprocess.run(cmd, check=True, capture_output=True, timeout=600, env=env)
            break
        except (subprocess.SubprocessError, OSError) as exc:
            errors.append(f'{" ".join(exc.cmd) if hasattr(exc, "cmd") else ""}: {exc}'.strip())
    chromium, driver = which()
    if not (chromium and driver):
        pytest.skip(f'chromium + chromedriver could not be installed with apt-get ({"; ".join(errors)})')
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _read_image(src: str) -> Image.Image:
    """An <img> src (data URL or http URL) -> the decoded image."""
    if src.startswith('data:'):
        return Image.open(io.BytesIO(base64.b64decode(src.split(',', 1)[1])))
    with urllib.request.urlopen(src, timeout=10) as response:
        return Image.open(io.BytesIO(response.read()))


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::DeprecationWarning:gradio.queueing')  # gradio's own use of pandas 3
def test_app_in_browser(engine, tmp_path):
    pytest.importorskip('gradio', reason="the app extra (pip install 'pgseg[app]') is not installed")
    pytest.importorskip('selenium', reason='the browser test needs selenium (pip install selenium)')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, chromedriver = find_browser()

    photo = _photo(tmp_path / 'photo.png')
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG\r\n\x1a\n not really')
    page = app_mod.build_app(engine, bg_thresh=0.5)
    port = _free_port()
    app_mod.launch_app(page, '127.0.0.1', port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1400,1000'):
        options.add_argument(arg)
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        driver.get(f'http://127.0.0.1:{port}/')
        wait = WebDriverWait(driver, 30, poll_frequency=0.2)

        def status_has(text):  # the status box's text, code spans and line breaks flattened
            return lambda d: text in ' '.join(d.find_element(By.ID, 'pgseg-status').text.split())

        def upload(path):
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#pgseg-photo input[type=file]'))
            driver.find_element(By.CSS_SELECTOR, '#pgseg-photo input[type=file]').send_keys(str(path))

        def segment(classes):
            box = driver.find_element(By.CSS_SELECTOR, '#pgseg-classes textarea')
            box.clear()
            box.send_keys(classes)
            driver.find_element(By.ID, 'pgseg-segment').click()

        upload(photo)
        wait.until(status_has('photo.png loaded'))
        segment('circle, square')
        wait.until(status_has('Segmented'))
        overlay = wait.until(lambda d: [img for img in d.find_elements(By.CSS_SELECTOR, '#pgseg-overlay img')
                                        if img.get_attribute('src')])[0]
        shown = _read_image(overlay.get_attribute('src'))
        assert shown.size == PHOTO_SIZE
        assert driver.execute_script('return [arguments[0].naturalWidth, arguments[0].naturalHeight]',
                                     overlay) == list(PHOTO_SIZE)
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '#pgseg-legend .pgseg-legend-name')]
        assert names == ['background', 'circle', 'square']
        assert driver.find_elements(By.CSS_SELECTOR, '#pgseg-groups img')
        table = driver.find_element(By.ID, 'pgseg-areas').text
        for name, pct in engine.run(photo, 'circle, square', 0.5).areas:  # the same request without the page
            assert name in table and f'{pct:g}' in table

        # the page's messages: empty classes, then an unreadable upload
        segment(' , ')
        wait.until(status_has('type at least one class name'))
        driver.find_element(By.CSS_SELECTOR, '#pgseg-photo button[aria-label="Clear"]').click()
        upload(broken)
        wait.until(status_has('cannot read broken.png'))
        segment('circle')
        wait.until(status_has('Upload a JPEG, PNG'))  # the segment button's message, not the upload's
        assert driver.find_elements(By.CSS_SELECTOR, '#pgseg-overlay img') == []
    finally:
        if driver is not None:
            driver.quit()
        page.close()
