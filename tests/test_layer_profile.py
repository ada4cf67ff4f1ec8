"""compress.layer_profile: per-op / per-layer CPU profile, torch (fp32 / PT2E int8 compiled) and OpenVINO (fp32 /
NNCF int8)."""
import math

import pytest

from compress.layer_profile import print_profile, profile_model


@pytest.fixture(scope='module')
def result():
    return profile_model('test_resnet_cifar', input_size=32, batch=2, backend='both', top=100, iters=1, rounds=3,
                         min_seconds=0.02)


@pytest.mark.parametrize('label,conv_op', [
    ('torch fp32 compiled', 'mkldnn::_convolution_pointwise'),
    ('torch int8 compiled', 'onednn::qconv_pointwise'),
    ('openvino fp32', 'Convolution ['),
    ('openvino int8', 'Convolution ['),
])
def test_rows_cover_the_time_and_include_convs(result, label, conv_op):
    prof = result[label]
    rows = prof['rows']
    assert prof['total_ms'] > 0 and rows
    # top=100 keeps every op: the rows partition the profiled time, and the kinds do too
    assert math.isclose(sum(r['ms'] for r in rows), prof['total_ms'], rel_tol=1e-6)
    assert math.isclose(sum(prof['by_kind'].values()), prof['total_ms'], rel_tol=1e-6)
    assert math.isclose(sum(r['pct'] for r in rows), 100, rel_tol=1e-6)
    assert [r['ms'] for r in rows] == sorted((r['ms'] for r in rows), reverse=True)
    convs = [r for r in rows if r['op'].startswith(conv_op)]
    assert convs and all(r['kind'] == 'conv/linear' for r in convs)
    assert prof['by_kind']['conv/linear'] > 0
    # conv time is mapped back to module names
    layers = dict(prof['by_layer'])
    assert any(name.startswith(('conv1', 'layer1')) for name in layers), layers


def test_int8_kernels_and_totals(result):
    int8_ops = {r['op'] for r in result['openvino int8']['rows']}
    assert any('I8' in op or 'i8' in op for op in int8_ops)  # OpenVINO runs the convs in int8
    assert result['pt2e_coverage'] == 1.0 and result['openvino_coverage'] == 1.0
    ms = result['cpu_ms']
    assert set(ms) == {'fp32 eager', 'torch fp32 compiled', 'torch int8 compiled', 'openvino fp32', 'openvino int8'}
    assert all(v > 0 for v in ms.values())
    for label in ('torch int8 / fp32', 'openvino int8 / fp32'):
        median, low, high = result['speedups'][label]
        assert 0 < low <= median <= high
    # profiled and unprofiled time of the same variant agree within the noise of a shared machine
    for label in ('torch fp32 compiled', 'openvino fp32'):
        assert 0.05 < result[label]['total_ms'] / ms[label] < 20


def test_print(result, capsys):
    print_profile(result, top=5)
    out = capsys.readouterr().out
    assert 'torch int8 / fp32' in out and 'openvino int8' in out and 'conv / linear layers only' in out
    assert 'interleaved rounds' in out
