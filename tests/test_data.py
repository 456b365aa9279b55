"""Synthetic data, shard and dataset layouts, the streaming pipeline (exactly once, bad samples), transforms."""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pgseg.data.synthetic.scenes import SYNONYMS, SceneConfig, caption_for, render_scene
from pgseg.data.synthetic.writers import check_scene_matches, scene_rng, write_caption_shards, write_segmentation_set
from pgseg.data.text import CaptionTokenizer, extract_prompt_words
from pgseg.data.transforms import TrainTransform, normalize_batch, to_rgb
from pgseg.data.webdataset import StreamPosition, TrainStream, expand_source


# ---------------------------------------------------------------------------------------------- synthetic scenes
def test_scenes_are_deterministic_and_labelled():
    cfg = SceneConfig(size=48)
    a, b = render_scene(scene_rng(3, 7), cfg), render_scene(scene_rng(3, 7), cfg)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, render_scene(scene_rng(3, 8), cfg).image)
    present = {cfg.classes[k - 1] for k in np.unique(a.mask) if k}
    assert present == {o.cls for o in a.objects} and present
    assert a.boundary.any() and not a.boundary[a.mask == 0].all()


def test_captions_name_every_visible_class():
    cfg = SceneConfig(size=48)
    for i in range(50):
        rng = scene_rng(0, i)
        scene = render_scene(rng, cfg)
        caption = caption_for(rng, scene.objects)
        for obj in scene.objects:
            assert any(word in caption for word in SYNONYMS[obj.cls]), (caption, obj.cls)


def test_forbidden_and_required_pairs():
    cfg = SceneConfig(size=32, min_objects=2, max_objects=4, forbidden_pairs=[('circle', 'star')])
    for i in range(100):
        classes = {o.cls for o in render_scene(scene_rng(1, i), cfg).objects}
        assert not {'circle', 'star'} <= classes
    need = SceneConfig(size=64, required_pair=('circle', 'star'), min_radius=0.1, max_radius=0.15)
    together = sum({'circle', 'star'} <= {o.cls for o in render_scene(scene_rng(2, i), need).objects}
                   for i in range(30))
    assert together >= 25  # both are drawn every time; rarely one hides the other completely


def test_caption_shard_layout(tmp_path):
    paths = write_caption_shards(str(tmp_path), 25, seed=0, samples_per_shard=10, scene=SceneConfig(size=32),
                                 progress=False)
    assert [os.path.basename(p) for p in paths] == ['00000.tar', '00001.tar', '00002.tar']
    assert json.load(open(tmp_path / 'sizes.json')) == {'00000.tar': 10, '00001.tar': 10, '00002.tar': 5}
    names = tarfile.open(paths[1]).getnames()
    assert names[:3] == ['000010000.jpg', '000010000.txt', '000010000.json']
    assert not any(n.endswith('.png') for n in names)  # no pixel labels in training data


def test_object_radius_and_reusing_data_of_another_design(tmp_path):
    small, big = SceneConfig(size=64, max_radius=0.15), SceneConfig(size=64, min_radius=0.3, max_radius=0.35)
    rng_radii = [[o.radius for o in render_scene(scene_rng(0, i), cfg).objects] for cfg in (small, big)
                 for i in range(20)]
    assert max(r for rs in rng_radii[:20] for r in rs) <= 0.15
    assert min(r for rs in rng_radii[20:] for r in rs) >= 0.3
    with pytest.raises(ValueError, match='min_radius <= max_radius'):
        SceneConfig(min_radius=0.3, max_radius=0.2)
    write_caption_shards(str(tmp_path), 3, scene=small, progress=False)
    check_scene_matches(str(tmp_path), small)  # same design: accepted
    with pytest.raises(ValueError, match=r'pgseg_classes.json: written with another scene design \(max_radius: has '
                                         r'0.15, expected 0.35, min_radius: has 0.12, expected 0.3\)'):
        check_scene_matches(str(tmp_path), big)
    with pytest.raises(ValueError, match='missing'):
        check_scene_matches(str(tmp_path / 'elsewhere'), small)


@pytest.mark.parametrize('layout,files', [
    ('voc', ['VOCdevkit/VOC2012/JPEGImages', 'VOCdevkit/VOC2012/SegmentationClass',
             'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt']),
    ('context', ['VOCdevkit/VOC2010/JPEGImages', 'VOCdevkit/VOC2010/SegmentationClassContext',
                 'VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt']),
    ('coco_object', ['coco/images/val2017', 'coco/annotations/val2017']),
])
def test_segmentation_layouts(tmp_path, layout, files):
    base = write_segmentation_set(str(tmp_path), layout, 4, seed=5, scene=SceneConfig(size=32), progress=False)
    for f in files:
        assert os.path.exists(tmp_path / f), f
    ann_dir = tmp_path / files[1]
    ann = [f for f in os.listdir(ann_dir) if f.endswith('.png')]
    assert len(ann) == 4 and os.path.isdir(base)
    label = Image.open(ann_dir / ann[0])
    values = set(np.unique(np.asarray(label)).tolist())
    if layout == 'voc':
        assert label.mode == 'P' and 255 in values  # palette PNG with ignore-labelled outlines
    else:
        assert label.mode == 'L' and 255 not in values
    if layout == 'coco_object':
        assert all(a.endswith('_instanceTrainIds.png') and len(a.split('_')[0]) == 12 for a in ann)


# ---------------------------------------------------------------------------------------------- the stream
def _stream(tmp_path, world=1, rank=0, workers=0, batch=4, steps=None, resampled=False, **kw):
    source = expand_source('s', str(tmp_path / '{00000..00003}.tar'))
    steps = steps or source.length // (batch * world)
    return TrainStream([source], TrainTransform(32, 'official_pgseg'), CaptionTokenizer(16), batch, steps,
                       seed=0, resampled=resampled, shuffle_buffer=5, rank=rank, world_size=world,
                       num_workers=workers, **kw)


def _keys(stream, workers):
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [k for _, _, info in loader for k in info['keys']]


def test_every_sample_exactly_once_over_two_ranks_and_two_workers(tmp_path):
    write_caption_shards(str(tmp_path), 32, samples_per_shard=8, scene=SceneConfig(size=32), progress=False)
    seen = []
    for rank in range(2):
        seen += _keys(_stream(tmp_path, world=2, rank=rank, workers=2), workers=2)
    assert len(seen) == 32 and len(set(seen)) == 32
    # the next epoch is another order of the same samples
    stream = _stream(tmp_path, world=2, rank=0, workers=2)
    stream.position.epoch = 1
    assert sorted(_keys(stream, 2)) != sorted(seen[:16]) or _keys(stream, 2) != seen[:16]


def _uneven_shards(folder, sizes):
    """Caption shards of the given sizes (img2dataset never fills them evenly), keys unique, with sizes.json."""
    listing = {}
    for i, n in enumerate(sizes):
        samples = [(f'{i:02d}{j:04d}', {'jpg': _jpeg_bytes(Image.new('RGB', (40, 40), (20 * i, 10 * j, 99))),
                                        'txt': f'a square {i} {j}'.encode()}) for j in range(n)]
        _write_tar(folder / f'{i:05d}.tar', samples)
        listing[f'{i:05d}.tar'] = n
    (folder / 'sizes.json').write_text(json.dumps(listing))
    return sum(sizes)


def _uneven_stream(folder, last, world, rank, workers, batch):
    source = expand_source('s', str(folder / f'{{00000..{last:05d}}}.tar'))
    return TrainStream([source], TrainTransform(32, 'official_pgseg'), CaptionTokenizer(16), batch,
                       source.length // (batch * world), seed=3, shuffle_buffer=5, rank=rank, world_size=world,
                       num_workers=workers)


def test_every_sample_once_per_epoch_over_uneven_shards_and_after_a_resume(tmp_path):
    """Shards of 13, 2, 9, 21 and 7 samples (one smaller than the batch), 2 ranks x 2 workers, batch 3: every
    sample of an epoch is read at most once, all but the N mod (global batch) spares, and each rank runs the
    same number of steps; a worker resumed mid-epoch delivers the rest of the same samples."""
    sizes = [13, 2, 9, 21, 7]
    total = _uneven_shards(tmp_path, sizes)
    world, workers, batch = 2, 2, 3
    per_rank = []
    for rank in range(world):
        stream = _uneven_stream(tmp_path, len(sizes) - 1, world, rank, workers, batch)
        per_rank.append(_keys(stream, workers))
    seen = [k for keys in per_rank for k in keys]
    steps = total // (batch * world)
    assert len(per_rank[0]) == len(per_rank[1]) == steps * batch
    assert len(set(seen)) == len(seen) == total - total % (batch * world)  # 52 samples: 48 read once, 4 spares
    # the next epoch reads another selection: its spares are other samples
    stream = _uneven_stream(tmp_path, len(sizes) - 1, world, 0, workers, batch)
    stream.position.epoch = 1
    assert _keys(stream, workers) != per_rank[0]
    # resume: rank 1 stopped after its first two batches (one from each worker) delivers the same remaining samples
    loader = DataLoader(_uneven_stream(tmp_path, len(sizes) - 1, world, 1, workers, batch), batch_size=None,
                        num_workers=workers)
    position = StreamPosition()
    for _, _, info in itertools.islice(loader, 2):
        position.update(info)
    resumed = _uneven_stream(tmp_path, len(sizes) - 1, world, 1, workers, batch)
    resumed.position = position
    assert _keys(resumed, workers) == per_rank[1][2 * batch:]


def test_batches_shapes_and_resampled_mode(tmp_path):
    write_caption_shards(str(tmp_path), 32, samples_per_shard=8, scene=SceneConfig(size=32), progress=False)
    images, tokens, info = next(iter(_stream(tmp_path, resampled=True, steps=3)))
    assert images.shape == (4, 3, 32, 32) and tokens.shape == (4, 16) and tokens.dtype == torch.long
    assert info['batches'] == 1


def test_too_few_shards_is_a_clear_error(tmp_path):
    """Shards of unknown sizes (a configured length, neither sizes.json nor *_stats.json) are split whole over the
    streams: fewer shards than streams is an error; with their sizes known, or resampling, any number of streams is
    fed."""
    write_caption_shards(str(tmp_path), 32, samples_per_shard=8, scene=SceneConfig(size=32), progress=False)
    bare = tmp_path / 'bare'
    bare.mkdir()
    for i in range(4):
        (bare / f'{i:05d}.tar').write_bytes((tmp_path / f'{i:05d}.tar').read_bytes())
    unsized = expand_source('s', str(bare / '{00000..00003}.tar'), length=32)
    assert unsized.sizes is None and unsized.length == 32
    with pytest.raises(ValueError, match='4 shards cannot feed 2 ranks x 4 workers'):
        TrainStream([unsized], TrainTransform(32, 'official_pgseg'), CaptionTokenizer(16), 4, 4, world_size=2,
                    num_workers=4)
    _stream(tmp_path, world=2, workers=4, resampled=True)  # resampling can feed any number of streams
    _stream(tmp_path, world=2, workers=4)  # so can the sample-by-sample plan of shards with known sizes


def test_missing_shards_and_sizes_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='do not exist'):
        expand_source('x', str(tmp_path / 'nope-{000..003}.tar'))
    (tmp_path / 'a.tar').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='sizes.json'):
        expand_source('x', str(tmp_path / 'a.tar'))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='JPEG')
    return buf.getvalue()


def _zero_size_png() -> bytes:
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 0, 0, 8, 2, 0, 0, 0)) + chunk(b'IEND', b'')


def _write_tar(path, samples):
    with tarfile.open(path, 'w') as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted_good_odd_formats_decoded(tmp_path):
    rgb = Image.new('RGB', (40, 30), (200, 10, 10))
    good_jpeg = _jpeg_bytes(rgb)
    arr16 = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    odd_but_fine = {
        'gray': _png_bytes(rgb.convert('L')), 'cmyk': _jpeg_bytes(rgb.convert('CMYK')),
        'rgba': _png_bytes(rgb.convert('RGBA')), 'palette': _png_bytes(rgb.convert('P')),
        'sixteen': _png_bytes(Image.fromarray(arr16)),
    }
    samples = [(f'ok_{name}', {'png' if name != 'cmyk' else 'jpg': data, 'txt': b'a red box'})
               for name, data in odd_but_fine.items()]
    samples += [
        ('truncated', {'jpg': good_jpeg[:len(good_jpeg) // 2], 'txt': b'a cut image'}),
        ('zero_size', {'png': _zero_size_png(), 'txt': b'nothing'}),
        ('empty_image', {'jpg': b'', 'txt': b'nothing'}),
        ('no_caption', {'jpg': good_jpeg}),
        ('empty_caption', {'jpg': good_jpeg, 'txt': b'   '}),
        ('latin1_caption', {'jpg': good_jpeg, 'txt': 'caf\xe9'.encode('latin-1')}),
        ('no_image', {'txt': b'a caption alone'}),
    ]
    samples += [(f'fill_{i}', {'jpg': good_jpeg, 'txt': b'a red square'}) for i in range(3)]
    _write_tar(tmp_path / 'bad.tar', samples)
    source = expand_source('bad', str(tmp_path / 'bad.tar'), length=len(samples))
    stream = TrainStream([source], TrainTransform(16, 'official_pgseg'), CaptionTokenizer(16), batch_size=8,
                         steps_per_epoch=1, shuffle_buffer=1)
    images, tokens, info = next(iter(stream))
    assert sorted(info['keys']) == sorted([f'ok_{n}' for n in odd_but_fine] + [f'fill_{i}' for i in range(3)])
    assert info['skipped'] == {'bad_image': 3, 'missing_caption': 1, 'bad_caption': 2, 'missing_image': 1}
    assert torch.isfinite(images).all()


def test_to_rgb_rescales_sixteen_bit():
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(img)).min() == 255
    img = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert abs(int(np.asarray(to_rgb(img))[0, 0, 0]) - 128) <= 1


def test_draft_decoding_matches_full_decoding():
    big = np.asarray(render_scene(scene_rng(0, 1), SceneConfig(size=512)).image)
    data = _jpeg_bytes(Image.fromarray(big))
    fast = TrainTransform(64, 'official_pgseg', scale=(0.5, 1.0), use_draft=True)
    slow = TrainTransform(64, 'official_pgseg', scale=(0.5, 1.0), use_draft=False)
    a, b = fast(data, random.Random(4)), slow(data, random.Random(4))
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == torch.uint8
    a, b = normalize_batch(a[None]), normalize_batch(b[None])
    assert (a - b).abs().mean() < 0.08  # the same crop; draft decoding differs only by resampling noise


def test_random_resized_crop_equals_torchvision_on_pil():
    """The official transform is torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image: crop, then
    Pillow's bilinear resize. Ours draws the same box and flip from the sample's rng and resizes with torch's uint8
    kernel, which rounds differently (by 1, rarely 2 grey levels); a wrong box, axis order or flip is far off."""
    from torchvision.transforms import functional as TF

    from pgseg.data.transforms import resize_uint8, sample_crop_box
    img = Image.fromarray(np.asarray(render_scene(scene_rng(0, 2), SceneConfig(size=320)).image)[:, :250])
    buf = io.BytesIO()
    img.save(buf, format='PNG')  # lossless: both sides see the same pixels
    ours = TrainTransform(96, 'official_pgseg')
    flips = 0
    for seed in range(12):  # crops of 91-245 pixels a side: upsampled and downsampled to 96
        got = ours(buf.getvalue(), random.Random(seed))
        rng = random.Random(seed)
        left, top, w, h = sample_crop_box(img.width, img.height, rng)
        want = TF.resized_crop(img, top, left, h, w, [96, 96], TF.InterpolationMode.BILINEAR)
        if rng.random() < 0.5:
            want, flips = TF.hflip(want), flips + 1
        diff = (got.int() - torch.from_numpy(np.array(want)).permute(2, 0, 1).int()).abs()
        assert got.shape == (3, 96, 96) and got.dtype == torch.uint8
        assert diff.max() <= 2 and diff.float().mean() < 0.5, (seed, diff.max(), diff.float().mean())
    assert 0 < flips < 12
    for size in ((224, 224), (300, 41), (7, 500)):  # down, up and mixed, against Pillow directly
        want = torch.from_numpy(np.array(img.resize(size[::-1], Image.BILINEAR))).permute(2, 0, 1)
        assert (resize_uint8(img, size).int() - want.int()).abs().max() <= 2


def test_worker_uint8_then_device_normalisation_equals_torchvision():
    from torchvision.transforms import functional as TF

    from pgseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_tensor, uint8_tensor
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    reference = TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(normalize_batch(uint8_tensor(img)[None])[0], reference, atol=1e-5)
    assert torch.allclose(normalize_tensor(img), reference, atol=1e-5)
    assert normalize_batch(reference[None]) is not None and torch.equal(normalize_batch(reference[None])[0], reference)


def test_multi_label_prompts():
    assert extract_prompt_words('Two red circles and a blue square on the grass') == ['circles', 'square', 'grass']
    assert extract_prompt_words('A photo of a box in front of bricks') == ['box', 'bricks']  # picture words dropped
    tok = CaptionTokenizer(16, num_prompts=3, templates=('a photo of a {}.',))
    out = tok('a cat on a sofa', random.Random(0))
    assert out.shape == (4, 16)
    assert torch.equal(out[0], out[3])  # only two words: the third prompt is the caption again


def test_named_backgrounds_and_their_words():
    from pgseg.data.synthetic.scenes import _BACKGROUND_PHRASES, BACKGROUNDS
    cfg = SceneConfig(size=32)
    seen = set()
    for i in range(40):
        rng = scene_rng(9, i)
        scene = render_scene(rng, cfg)
        seen.add(scene.background)
        caption = caption_for(rng, scene.objects, scene.background, background_probability=1.0)
        assert any(p in caption for p in _BACKGROUND_PHRASES[scene.background]), caption
    assert seen == set(BACKGROUNDS)
    with pytest.raises(ValueError, match='background'):
        SceneConfig(backgrounds=('lava',))


def test_sizes_json_that_overstates_a_shard_is_a_loud_error(tmp_path):
    """sizes.json listing more samples than a shard holds leaves a stream with nothing to read: an error naming the
    shard and sizes.json, not a worker spinning forever."""
    total = _uneven_shards(tmp_path, [4, 4])
    (tmp_path / 'sizes.json').write_text(json.dumps({'00000.tar': 4, '00001.tar': 400}))
    stream = _uneven_stream(tmp_path, 1, world=2, rank=1, workers=1, batch=4)
    assert total == 8
    with pytest.raises(RuntimeError, match=r'00001.tar.*sizes.json'):
        _keys(stream, 0)
