"""Evaluation: metrics by hand, readers on official layouts, preprocessing, protocols, 2-process evaluation,
dataset preparation, ImageNet zero-shot, the Segmenter and pgseg-segment / pgseg-eval."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import pgseg
from pgseg.data.synthetic.scenes import SceneConfig
from pgseg.data.synthetic.writers import write_segmentation_set
from pgseg.eval.classes import COCO_OBJECT, VOC
from pgseg.eval.datasets import DATASETS, LayoutError, build_dataset
from pgseg.eval.imagenet import evaluate_imagenet
from pgseg.eval.inference import pamr, predict_labels, preprocess_image
from pgseg.eval.metrics import confusion_matrix, segmentation_metrics
from pgseg.eval.prepare import CITYSCAPES_ID_TO_TRAIN_ID, coco_stuff_to_object_lut, convert_cityscapes
from pgseg.eval.protocols import get_protocol
from pgseg.eval.segmentation import evaluate_segmentation
from pgseg.evaluate import main as eval_main
from pgseg.segment import main as segment_main
from tests.helpers import tiny_model_config

SMALL = dict(short_side=32, crop_size=32, stride=16)


def test_metrics_by_hand_with_absent_class_and_ignore():
    label = np.array([[0, 0, 1, 1], [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1], [3, 3, 2, 2]])  # class 3 is predicted but absent; the 255 pixel is ignored
    conf = confusion_matrix(pred, label, num_classes=5)
    assert conf.sum() == 7
    m = segmentation_metrics(conf, ['a', 'b', 'c', 'd', 'e'])
    # IoU: a 1/3 (1 hit, union {0,0,0}), b 2/4, c 1/2, d 0/1 (predicted, absent), e: empty union -> left out
    expected = {'a': 100 / 3, 'b': 50.0, 'c': 50.0, 'd': 0.0, 'e': None}
    for k, v in expected.items():
        assert (m['per_class_iou'][k] is None) if v is None else m['per_class_iou'][k] == pytest.approx(v)
    assert m['miou'] == pytest.approx((100 / 3 + 50 + 50 + 0) / 4)
    assert m['pixel_accuracy'] == pytest.approx(100 * 4 / 7)


def test_confusion_rejects_bad_labels():
    with pytest.raises(ValueError, match='outside'):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), num_classes=3)


def test_preprocess_follows_mmcv_rescale():
    assert preprocess_image(Image.new('RGB', (500, 375))).shape == (1, 3, 448, 597)
    assert preprocess_image(Image.new('RGB', (3000, 200))).shape == (1, 3, 137, 2048)  # long side capped
    x = preprocess_image(Image.new('RGB', (448, 448), (123, 116, 104)))
    assert x.abs().max() < 0.02  # the mean colour normalises to ~0


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    for layout in ('voc', 'context', 'coco_object'):
        write_segmentation_set(str(root), layout, 5, seed=3, scene=SceneConfig(size=32), progress=False)
    return str(root)


@pytest.mark.parametrize('name,num', [('voc', 9), ('voc20', 8), ('context', 9), ('context59', 8),
                                      ('coco_object', 9)])
def test_readers_on_official_layouts(synthetic_root, name, num):
    ds = build_dataset(name, synthetic_root)
    assert len(ds) == 5 and ds.num_classes == num
    image, label, _ = ds[0]
    assert image.mode == 'RGB' and label.shape == (32, 32) and label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values <= set(range(num)) | {255}
    if DATASETS[name].reduce_zero_label:  # background became ignore
        raw = np.asarray(Image.open(ds.label_path(ds.ids[0])))
        assert ((raw == 0) == (label == 255))[raw != 255].all()


def test_readers_for_the_other_benchmarks(tmp_path):
    """COCO-Stuff, Cityscapes (city sub-folders) and ADE20K (reduce_zero_label) in their layouts."""
    def put(path, array):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)
    rgb = np.zeros((8, 8, 3), np.uint8)
    put(tmp_path / 'coco_stuff164k/images/val2017/000000000001.jpg', rgb)
    put(tmp_path / 'coco_stuff164k/annotations/val2017/000000000001_labelTrainIds.png', np.full((8, 8), 170, np.uint8))
    put(tmp_path / 'cityscapes/leftImg8bit/val/bonn/bonn_0_leftImg8bit.png', rgb)
    put(tmp_path / 'cityscapes/gtFine/val/bonn/bonn_0_gtFine_labelTrainIds.png', np.full((8, 8), 18, np.uint8))
    put(tmp_path / 'ADEChallengeData2016/images/validation/ADE_val_1.jpg', rgb)
    put(tmp_path / 'ADEChallengeData2016/annotations/validation/ADE_val_1.png', np.array([[0, 1], [150, 2]], np.uint8))
    assert build_dataset('coco_stuff', str(tmp_path))[0][1].max() == 170
    city = build_dataset('cityscapes', str(tmp_path))
    assert city.ids == ['bonn/bonn_0'] and city.num_classes == 19
    assert build_dataset('ade20k', str(tmp_path))[0][1].tolist() == [[255, 0], [149, 1]]


def test_missing_layout_names_the_expected_tree(tmp_path):
    with pytest.raises(LayoutError, match=r'(?s)VOCdevkit/VOC2012.*JPEGImages/\{id\}\.jpg'):
        build_dataset('voc', str(tmp_path))


def test_output_size_equals_input_size_for_odd_sizes():
    model = pgseg.build_model(tiny_model_config()).eval()
    classes = model.class_embeddings(['cat', 'dog'])
    protocol = get_protocol('pgseg', **SMALL)
    for size in [(37, 53), (61, 29)]:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))
        labels, scores = predict_labels(model, image, classes, 0.5, True, protocol)
        assert labels.shape == size and scores.shape == (3, *size)


def test_protocol_background_values():
    assert get_protocol('pgseg').background_for('context') == (0.36, False)
    assert get_protocol('groupvit').background_for('coco_object') == (0.95, False)
    assert get_protocol('bench8').background_for('voc') == (0.5, True)
    with pytest.raises(ValueError, match='no background threshold'):
        get_protocol('pgseg').background_for('unknown')


def test_pamr_keeps_constant_masks():
    masks = torch.zeros(1, 2, 9, 9)
    masks[:, 1] = 1.0
    out = pamr(torch.rand(1, 3, 9, 9), masks, dilations=(1, 2), num_iters=3)
    torch.testing.assert_close(out, masks)


def _pamr_by_hand(image: np.ndarray, masks: np.ndarray, dilations, y: int, x: int) -> np.ndarray:
    """One PAMR iteration at pixel (y, x), loop by loop: the colour spread over each dilation's 3x3 neighbourhood
    with the centre (9 values per dilation, unbiased), the similarity of the 8 neighbours, softmax, average."""
    C, H, W = image.shape

    def at(a, yy, xx):  # replicate padding
        return a[:, min(max(yy, 0), H - 1), min(max(xx, 0), W - 1)]
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    spread = np.stack([at(image, y + oy, x + ox) for oy, ox in offsets], axis=1).std(axis=1, ddof=1)  # [3]
    ring = [(oy, ox) for oy, ox in offsets if oy or ox]
    sim = np.array([np.mean(-np.abs(at(image, y + oy, x + ox) - image[:, y, x]) / (1e-8 + 0.1 * spread))
                    for oy, ox in ring])
    w = np.exp(sim - sim.max())
    w /= w.sum()
    return sum(wk * at(masks, y + oy, x + ox) for wk, (oy, ox) in zip(w, ring))


def test_pamr_matches_a_hand_computation_with_the_centre_in_the_colour_spread():
    rng = np.random.default_rng(3)
    image, masks = rng.random((3, 7, 8)), rng.random((2, 7, 8))
    out = pamr(torch.from_numpy(image)[None].float(), torch.from_numpy(masks)[None].float(), dilations=(1, 2),
               num_iters=1)[0].double().numpy()
    for y, x in [(0, 0), (3, 4), (6, 7), (2, 1)]:
        np.testing.assert_allclose(out[:, y, x], _pamr_by_hand(image, masks, (1, 2), y, x), rtol=1e-5, atol=1e-6)


def _eval_worker(rank, init_file, root, expected):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = pgseg.build_model(tiny_model_config()).eval()
        m = evaluate_segmentation(model, build_dataset('voc', root), get_protocol('pgseg', **SMALL), progress=False)
        assert m['per_class_iou'] == expected['per_class_iou'] and m['num_pixels'] == expected['num_pixels']
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_evaluation_equals_one(synthetic_root, tmp_path):
    torch.manual_seed(0)
    model = pgseg.build_model(tiny_model_config()).eval()
    expected = evaluate_segmentation(model, build_dataset('voc', synthetic_root), get_protocol('pgseg', **SMALL),
                                     progress=False)
    assert expected['num_pixels'] > 0 and 'pgseg' in expected['protocol']
    mp.spawn(_eval_worker, args=(str(tmp_path / 'init'), synthetic_root, expected), nprocs=2, join=True)


def test_evaluation_reduces_on_the_device_the_backend_takes(synthetic_root, monkeypatch):
    # NCCL reduces CUDA tensors only: the CPU confusion matrix must travel to the device the backend names (tested
    # here by standing in for the group: two "ranks" whose all-reduce doubles, and a recorded device choice)
    import pgseg.runtime.distributed as distributed
    torch.manual_seed(0)
    model = pgseg.build_model(tiny_model_config()).eval()
    dataset, protocol = build_dataset('voc', synthetic_root), get_protocol('pgseg', **SMALL)
    alone = evaluate_segmentation(model, dataset, protocol, progress=False, limit=2)
    asked, reduced = [], []

    def backend_device():
        asked.append(True)
        return torch.device('cpu')

    def fake_all_reduce(t, op=None):
        reduced.append(t.device)
        t.mul_(2)
    monkeypatch.setattr(distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(distributed, '_flag_device', backend_device)
    monkeypatch.setattr(distributed.dist, 'all_reduce', fake_all_reduce)
    summed = evaluate_segmentation(model, dataset, protocol, progress=False, limit=2)
    assert asked == [True] and reduced == [torch.device('cpu')]
    assert summed['num_pixels'] == 2 * alone['num_pixels']


def test_coco_object_lookup_matches_the_official_mapping():
    lut = coco_stuff_to_object_lut()
    assert lut[0] == 1 and lut[89] == 80 and lut[10] == 11 and lut[12] == 12  # ids 11 and 90 are unused
    assert lut[91] == 0 and lut[181] == 0 and lut[255] == 0  # stuff and unlabeled are background
    assert sorted(set(lut.tolist())) == list(range(81))


def test_coco_object_from_instances_uses_the_fixed_category_ids(tmp_path):
    """An instances file listing only the categories it uses (cat 17, dog 18) is labelled by COCO's fixed ids, as
    the stuff path labels the same categories; crowd annotations are not painted; a later instance is painted over
    an earlier one where they overlap (COCO-Stuff's conversion of thing annotations)."""
    pytest.importorskip('pycocotools')
    from pgseg.eval.prepare import COCO_CATEGORY_IDS, convert_coco_object_from_instances

    def box(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    anns = [
        {'id': 1, 'image_id': 7, 'category_id': 18, 'segmentation': box(0, 0, 10, 10), 'area': 100, 'iscrowd': 0,
         'bbox': [0, 0, 10, 10]},
        {'id': 2, 'image_id': 7, 'category_id': 17, 'segmentation': box(5, 5, 15, 15), 'area': 100, 'iscrowd': 0,
         'bbox': [5, 5, 10, 10]},
        {'id': 3, 'image_id': 7, 'category_id': 18, 'area': 16, 'iscrowd': 1, 'bbox': [16, 0, 4, 4],
         'segmentation': {'size': [20, 20], 'counts': [320, 4, 16, 4, 16, 4, 16, 4, 16]}},
    ]
    doc = {'images': [{'id': 7, 'file_name': '000000000007.jpg', 'height': 20, 'width': 20}], 'annotations': anns,
           'categories': [{'id': 17, 'name': 'cat'}, {'id': 18, 'name': 'dog'}]}
    path = tmp_path / 'instances_val2017.json'
    path.write_text(json.dumps(doc))
    assert convert_coco_object_from_instances(str(path), str(tmp_path / 'none'), str(tmp_path / 'out'), 'val2017') == 1
    label = np.asarray(Image.open(tmp_path / 'out/annotations/val2017/000000000007_instanceTrainIds.png'))
    cat, dog = COCO_OBJECT.index('cat'), COCO_OBJECT.index('dog')
    assert (cat, dog) == (16, 17) and COCO_CATEGORY_IDS[cat - 1] == 17 and COCO_CATEGORY_IDS[dog - 1] == 18
    lut = coco_stuff_to_object_lut()  # the stuff path: 0-based stuff id (category id - 1) -> the same labels
    assert lut[17 - 1] == cat and lut[18 - 1] == dog
    assert label[2, 2] == dog and label[12, 12] == cat and label[7, 7] == cat  # the later instance on top
    assert label[0:4, 16:20].max() == 0 and label[18, 2] == 0  # crowd and unannotated pixels stay background
    bad = dict(doc, annotations=[dict(anns[0], category_id=12)])  # 12 is not a COCO object id
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r'instances_val2017.json: category ids \[12\]'):
        convert_coco_object_from_instances(str(path), str(tmp_path / 'none'), str(tmp_path / 'out2'), 'val2017')


def test_coco_object_conversion_from_stuff_labels(tmp_path):
    from pgseg.eval.prepare import convert_coco_object_from_stuff
    coco = tmp_path / 'coco'
    os.makedirs(coco / 'annotations/val2017')
    os.makedirs(coco / 'images/val2017')
    stuff = np.array([[0, 89], [91, 255]], np.uint8)  # person, toothbrush, a stuff class, unlabeled
    Image.fromarray(stuff).save(coco / 'annotations/val2017/000000000139.png')
    Image.fromarray(stuff).save(coco / 'annotations/val2017/000000000139_labelTrainIds.png')  # mmseg's, not a source
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(coco / 'images/val2017/000000000139.jpg')
    out = tmp_path / 'out'
    for _ in range(2):  # a second run converts the same one file again
        assert convert_coco_object_from_stuff(str(coco), str(out)) == 1
    assert sorted(os.listdir(out / 'annotations/val2017')) == ['000000000139_instanceTrainIds.png']
    labels = np.asarray(Image.open(out / 'annotations/val2017/000000000139_instanceTrainIds.png'))
    assert labels.tolist() == [[1, 80], [0, 0]]
    assert os.path.isfile(out / 'images/val2017/000000000139.jpg')


def test_cityscapes_train_ids(tmp_path):
    folder = tmp_path / 'gtFine/val/bonn'
    os.makedirs(folder)
    Image.fromarray(np.array([[7, 26], [0, 33]], np.uint8)).save(folder / 'x_gtFine_labelIds.png')
    assert convert_cityscapes(str(tmp_path)) == 1
    out = np.asarray(Image.open(folder / 'x_gtFine_labelTrainIds.png'))
    assert out.tolist() == [[0, 13], [255, 18]] and len(CITYSCAPES_ID_TO_TRAIN_ID) == 19


def test_imagenet_folder_and_shards_each_image_once(tmp_path):
    model = pgseg.build_model(tiny_model_config()).eval()
    folder = tmp_path / 'val'
    for k in range(1000):
        os.makedirs(folder / f'n{k:08d}')
    buf = io.BytesIO()
    Image.new('RGB', (40, 30), (10, 200, 30)).save(buf, 'JPEG')
    for k in (3, 500, 999):
        (folder / f'n{k:08d}' / 'a.jpg').write_bytes(buf.getvalue())
    r = evaluate_imagenet(model, str(folder), progress=False)
    assert r['num_images'] == 3 and 0 <= r['top1'] <= r['top5'] <= 100
    with tarfile.open(tmp_path / 'in-000.tar', 'w') as tar:
        for i, k in enumerate((1, 2)):
            for ext, data in (('jpg', buf.getvalue()), ('cls', str(k).encode())):
                info = tarfile.TarInfo(f'{i:04d}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert evaluate_imagenet(model, str(tmp_path / 'in-000.tar'), progress=False)['num_images'] == 2


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = pgseg.build_model(tiny_model_config())
    return pgseg.save_checkpoint(tmp_path / 'ckpt', model, model.cfg)


def test_segmenter_on_odd_images(tiny_checkpoint):
    model = pgseg.load_model(tiny_checkpoint)
    seg = pgseg.Segmenter(model, ['circle', 'square'], bg_thresh=0.5, protocol=get_protocol('pgseg', **SMALL))
    rgba = Image.new('RGBA', (33, 21), (255, 0, 0, 128))
    sixteen = Image.fromarray((np.arange(30 * 20).reshape(20, 30) * 90).astype(np.uint16))
    for image in (rgba, Image.new('L', (25, 40)), Image.new('CMYK', (30, 30)), sixteen):
        result = seg(image)
        assert result.labels.shape == (image.height, image.width)
        assert sum(result.areas.values()) == pytest.approx(1.0)
        assert result.overlay().size == image.size


def test_segmenter_applies_exif_orientation(tiny_checkpoint, tmp_path):
    img = Image.new('RGB', (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / 'rot.jpg', exif=exif)
    seg = pgseg.Segmenter(pgseg.load_model(tiny_checkpoint), ['sky'], protocol=get_protocol('pgseg', **SMALL))
    assert seg(tmp_path / 'rot.jpg').labels.shape == (40, 20)


def test_segment_outputs_are_at_the_input_size_whatever_the_decode(tiny_checkpoint, tmp_path):
    """A 3000 x 2200 JPEG, turned upright by EXIF, is decoded reduced (draft mode) for inference; the label map, the
    overlay and the recorded size are the upright image's own."""
    img = Image.new('RGB', (3000, 2200), (30, 120, 200))
    exif = img.getexif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 2200 x 3000
    img.save(tmp_path / 'big.jpg', exif=exif, quality=80)
    code = segment_main([str(tmp_path / 'big.jpg'), '--classes', 'sky', '--checkpoint', str(tiny_checkpoint),
                         '--out', str(tmp_path / 'out'), '--bg-thresh', '0.5'])
    assert code == 0
    assert Image.open(tmp_path / 'out' / 'big_labels.png').size == (2200, 3000)
    assert Image.open(tmp_path / 'out' / 'big_overlay.png').size == (2200, 3000)
    assert json.load(open(tmp_path / 'out' / 'big_areas.json'))['size'] == [2200, 3000]


def test_segment_cli_processes_good_images_despite_a_bad_one(tiny_checkpoint, tmp_path, capsys):
    Image.new('RGB', (30, 20), (0, 200, 0)).save(tmp_path / 'good.png')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    code = segment_main([str(tmp_path / 'good.png'), str(tmp_path / 'broken.jpg'), '--classes', 'grass, sky',
                         '--checkpoint', str(tiny_checkpoint), '--out', str(tmp_path / 'out'), '--bg-thresh', '0.5'])
    assert code == 0
    assert 'cannot read' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / 'out')) == ['good_areas.json', 'good_labels.png', 'good_overlay.png']
    areas = json.load(open(tmp_path / 'out' / 'good_areas.json'))
    assert areas['classes'] == ['background', 'grass', 'sky']
    assert Image.open(tmp_path / 'out' / 'good_labels.png').mode == 'P'


def test_eval_cli(tiny_checkpoint, synthetic_root, tmp_path, capsys):
    code = eval_main(['--checkpoint', str(tiny_checkpoint), '--dataset', 'voc', '--dataset', 'coco_object',
                      '--data-root', synthetic_root, '--out', str(tmp_path), '--short-side', '32', '--crop-size',
                      '32', '--stride', '16', '--visualize', '2'])
    assert code == 0
    out = capsys.readouterr().out
    assert 'mIoU' in out and 'protocol pgseg' in out
    results = json.load(open(tmp_path / 'results.json'))
    assert [r['dataset'] for r in results['results']] == ['voc', 'coco_object']
    assert os.path.isfile(tmp_path / 'voc_visuals.png')
    assert eval_main(['--checkpoint', str(tiny_checkpoint), '--dataset', 'ade20k', '--data-root', str(tmp_path)]) == 2


class _FixedGroupsModel:
    """Two final groups on a 2x2 patch grid (left column: group 0, right column: group 1) with given embeddings."""

    def __init__(self, group_embeds: torch.Tensor):
        self.group_embeds, self.logit_scale = group_embeds, torch.tensor(4.0)

    def eval(self):
        return self

    def encode_image(self, x, with_group_embeds=True):
        from pgseg.models.groupseg import ImageOutput
        maps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]).unsqueeze(0)  # [1, 4 patches, 2]
        return ImageOutput(image_embeds=self.group_embeds.mean(1), group_embeds=self.group_embeds,
                           group_maps=[maps], grid=(2, 2))


class _OneImageSet:
    classes = ('background', 'a', 'b', 'c')
    num_classes = 4

    def __len__(self):
        return 1

    def __getitem__(self, i):
        label = np.zeros((8, 8), dtype=np.uint8)
        label[:, 4:] = 1  # left half background, right half class 'a'
        return np.zeros((8, 8, 3), dtype=np.uint8), label, 'img'


@pytest.mark.parametrize('background_as,object_as,named,leak', [
    (2, 0, 100.0, 0.0),  # object group named 'a'; background group closest to 'c', absent from the image
    (0, 1, 0.0, 100.0),  # background group closest to 'a' (present: a leak); object group named 'b' (wrong)
])
def test_naming_diagnostics_by_hand(background_as, object_as, named, leak):
    from types import SimpleNamespace

    from pgseg.eval.diagnostics import grouping_diagnostics
    classes = torch.eye(3)  # 'a', 'b', 'c' as orthonormal embeddings
    model = _FixedGroupsModel(torch.stack([classes[background_as], classes[object_as]]).unsqueeze(0))
    out = grouping_diagnostics(model, _OneImageSet(), SimpleNamespace(short_side=8, long_side=8), classes)
    assert (out['object_groups'], out['background_groups']) == (1, 1)
    assert (out['object_groups_named'], out['background_group_leak']) == (named, leak)
    assert out['distinct_groups_per_image'] == 2.0 and out['group_oracle_miou'] == 100.0  # background and 'a' exact


class _NamedGroupsModel(_FixedGroupsModel):
    """_FixedGroupsModel with a text side: each name is one axis of the embedding space."""
    AXES = {'a': 0, 'b': 1, 'c': 2, 'grass': 3}

    def class_embeddings(self, names, templates=None):
        return torch.eye(4)[[self.AXES[n] for n in names]]


class _OneImageDataset(_OneImageSet):
    split, ids = 'val', ['img']

    class spec:
        name, classes = 'voc', VOC  # its own class list, not the official one: kept under every naming


def test_background_words_turn_their_pixels_into_background():
    # left group (true background) is 'grass', right group (true 'a') is 'a'; the threshold never fires (0.0), so
    # without the word the left half takes one of the classes, and with it the left half is background
    model = _NamedGroupsModel(torch.eye(4)[[3, 0]].unsqueeze(0))
    plain = get_protocol('pgseg', short_side=8, crop_size=8, stride=8)
    words = get_protocol('pgseg', short_side=8, crop_size=8, stride=8, background_words=('grass',))
    without = evaluate_segmentation(model, _OneImageDataset(), plain, bg_thresh=0.0, progress=False)
    with_words = evaluate_segmentation(model, _OneImageDataset(), words, bg_thresh=0.0, progress=False)
    assert without['per_class_iou']['background'] == 0.0
    assert with_words['per_class_iou']['background'] == 100.0 and with_words['per_class_iou']['a'] == 100.0
    assert 'background words grass' in with_words['protocol']


class _GridGroupsModel(_FixedGroupsModel):
    """Two final groups on a 4x4 patch grid: columns 0-1 group 0, columns 2-3 group 1."""

    def encode_image(self, x, with_group_embeds=True):
        from pgseg.models.groupseg import ImageOutput
        left = (torch.arange(16) % 4 < 2).float()
        maps = torch.stack([left, 1 - left], dim=1).unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, 16, 2]
        embeds = self.group_embeds.expand(x.shape[0], -1, -1)
        return ImageOutput(image_embeds=embeds.mean(1), group_embeds=embeds, group_maps=[maps], grid=(4, 4))


def test_bench8_pamr_refines_each_window_on_the_patch_grid_before_upsampling():
    import torch.nn.functional as F

    from pgseg.eval.inference import crop_logits, group_class_affinity
    model = _GridGroupsModel(torch.tensor([[[1.0, 0.2], [0.1, 1.0]]]))
    classes = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    crop = torch.zeros(1, 3, 16, 16)
    crop[..., :, 5:] = 2.0  # a colour edge at x = 5, not on the groups' edge (x = 8)
    got = crop_logits(model, crop, classes, bg_thresh=0.4, bg_constant=True, window_pamr=True)
    # by hand: the per-crop rule on the 4x4 grid, PAMR against the crop downsampled to 4x4 (corners aligned), then
    # bilinear upsampling to the crop; the constant background 0.4 as channel 0
    affinity = group_class_affinity(model.group_embeds, model.group_embeds.mean(1), classes, model.logit_scale)
    grid = affinity[0].t()[:, (torch.arange(16) % 4 >= 2).long()].reshape(1, 2, 4, 4)  # [1, K, 4, 4]
    refined = pamr(F.interpolate(crop, size=(4, 4), mode='bilinear', align_corners=True), grid)
    expected = F.interpolate(refined, size=(16, 16), mode='bilinear', align_corners=False)
    torch.testing.assert_close(got[:, 1:], expected)
    assert (got[:, 0] == 0.4).all()
    assert not torch.allclose(refined, grid)  # the refinement did move the grid's scores
    whole = pamr(crop, crop_logits(model, crop, classes, bg_thresh=0.4, bg_constant=True)[:, 1:])
    assert not torch.allclose(got[:, 1:], whole, atol=1e-3)  # not the full-resolution placement


def test_protocols_carry_the_reproduced_codes_background_templates_and_names():
    from types import SimpleNamespace

    from pgseg.eval.segmentation import class_prompts
    from pgseg.eval.templates import get_templates
    assert get_protocol('bench8').background_for('voc') == (0.5, True)
    assert get_protocol('bench8_pamr').background_for('voc') == (0.4, True)
    assert get_protocol('bench8_pamr').pamr == 'window' and get_protocol('bench8').pamr == 'off'
    tcl = get_templates(get_protocol('bench8').templates)
    assert len(tcl) == 9 and tcl[-2:] == ('a photo of many {}.', 'a photo of {}s.')
    assert get_protocol('pgseg').templates == get_protocol('groupvit').templates == 'simple'

    def names(dataset, protocol):
        spec = DATASETS[dataset]
        return class_prompts(SimpleNamespace(classes=spec.classes, spec=spec), get_protocol(protocol))[0]
    mmseg_voc = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
                 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor']
    assert names('voc', 'bench8') == names('voc20', 'bench8_pamr') == mmseg_voc
    context = names('context', 'bench8')
    assert context == names('context59', 'bench8') and len(context) == 59
    assert (context[0], context[39], context[54]) == ('aeroplane', 'pottedplant', 'tvmonitor')
    assert names('coco_object', 'bench8')[4] == names('coco_object', 'groupvit')[4] == 'airplane'
    assert names('coco_object', 'pgseg')[4] == 'aeroplane '  # PGSeg's, trailing space included
    assert names('voc', 'pgseg')[10] == 'table' and names('context', 'groupvit')[0] == 'airplane'
    differ = sum(a != b for d in DATASETS for a, b in zip(names(d, 'pgseg'), names(d, 'bench8')))
    assert differ == 13
