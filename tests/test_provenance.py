"""Unit tests of deepfake_course.defend.provenance (C2PA signing and validation, perceptual hashes, watermark, verify)
and of the fake-set writer's signing and the `deepfake-course verify` command."""
import io, json, contextlib, struct, zlib
import numpy as np, pytest
from pathlib import Path

pytest.importorskip('c2pa')
from deepfake_course.defend import provenance as pv
from deepfake_course.media import write_png, read_provenance, provenance_tags


def _img(seed, h=64, w=64):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return tmp_path_factory.mktemp('prov')


@pytest.fixture(scope='module')
def signed(root):
    p = write_png(root / 'fake.png', _img(0), provenance_tags('toy', fake_set='toy/abc'))
    pv.sign_file(p, method='toy', fake_set='toy/abc', config={'k': 1}, data_root=root)
    return p


def test_keys_made_once_under_data_root_with_c2pa_usages(root):
    from cryptography import x509
    d = pv.course_keys(root)
    assert d == root / 'keys' and pv.course_keys(root) == d
    before = (d / 'signer.pem').read_bytes(); assert pv.course_keys(root) and (d / 'signer.pem').read_bytes() == before
    leaf, ca = x509.load_pem_x509_certificates((d / 'signer.pem').read_bytes())
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert [u._name for u in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value] == ['emailProtection']
    assert leaf.issuer == ca.subject and leaf.public_key().curve.name == 'secp256r1'
    assert (d / 'signer.key').stat().st_mode & 0o077 == 0


def test_signed_png_validates_untrusted_with_claims_and_keeps_tag(signed, root):
    r = pv.read_c2pa(signed)
    assert (r['present'], r['valid'], r['trusted'], r['status']) == (True, True, False, 'valid-untrusted')
    assert r['failures'] == [pv.UNTRUSTED]
    assert r['claims']['method'] == 'toy' and r['claims']['fake_set'] == 'toy/abc' and r['claims']['config'] == {'k': 1}
    assert r['claims']['ai_generated'] and r['claims']['digital_source_type'].endswith('trainedAlgorithmicMedia')
    assert read_provenance(signed)['fake_set'] == 'toy/abc'
    assert pv.read_c2pa(signed, trust_anchors=(root / 'keys' / 'ca.pem').read_text())['status'] == 'trusted'
    t = pv.manifest_table(r); assert 'claim: fake_set' in set(t.field)


def test_one_pixel_edit_fails_and_resave_strips(signed, root):
    from PIL import Image
    data = signed.read_bytes()
    ed = pv.edit_png_pixels(data, lambda a: a.__setitem__((10, 10, 1), a[10, 10, 1] ^ 1))
    assert sum(t == b'caBX' for t, _ in pv.png_chunks(ed)) == 1          # the manifest is still there
    (root / 'ed.png').write_bytes(ed)
    r = pv.read_c2pa(root / 'ed.png')
    assert r['status'] == 'invalid' and not r['valid'] and 'assertion.dataHash.mismatch' in r['failures']
    Image.open(signed).save(root / 'resaved.png'); Image.open(signed).convert('RGB').save(root / 'resaved.jpg', quality=90)
    for q in ('resaved.png', 'resaved.jpg'):
        assert pv.read_c2pa(root / q)['status'] == 'none'


def test_mp4_signs_and_validates_offline(root):
    from deepfake_course.core import write_mp4
    v = write_mp4(root / 'v.mp4', _img(1, 32, 32)[None].repeat(4, 0), fps=4, metadata=provenance_tags('toy'))
    pv.sign_file(v, method='toy', data_root=root)
    assert pv.read_c2pa(v)['status'] == 'valid-untrusted'


def test_bad_inputs_are_named(root):
    with pytest.raises(ValueError, match='course_manifest'): pv.course_manifest('')
    (root / 'x.bmp').write_bytes(b'BM')
    with pytest.raises(ValueError, match='x.bmp'): pv.sign_file(root / 'x.bmp', method='toy', data_root=root)
    with pytest.raises(FileNotFoundError, match='nope.png'): pv.sign_file(root / 'nope.png', method='toy', data_root=root)


def test_hamming_and_hashes():
    a = np.array([[1, 1, 0, 0]], bool); b = np.array([[1, 0, 0, 1], [0, 0, 1, 1]], bool)
    assert pv.hamming(a, b).tolist() == [[2, 4]]
    im = _img(2, 128, 128)
    for kind in pv.HASHES:
        h = pv.perceptual_hash([im, pv.reshare(im, 'jpeg', 90)], kind)
        assert h.shape == (2, 64) and pv.hamming(h[:1], h[1:])[0, 0] <= 6
    with pytest.raises(ValueError, match='kind'): pv.perceptual_hash([im], 'sha1')
    with pytest.raises(ValueError, match='reshare'): pv.reshare(im, 'rotate', 1)


def test_curve_and_threshold():
    c = pv.match_curve([0, 2, 9], [5, 30, 40, 50], bits=64)
    assert c.loc[c.threshold == 5, ['tmr', 'fmr']].values.tolist() == [[2 / 3, 0.25]]
    assert c.tmr.is_monotonic_increasing and c.fmr.iloc[-1] == 1.0
    assert pv.threshold_at_fmr(np.array([5, 30, 40, 50]), 0.25) == 29 and pv.threshold_at_fmr(np.array([0]), 0.5) == -1


def test_watermark_round_trip_and_size_error():
    from deepfake_course.data.synth import render_faces
    face = (render_faces([0], 1, size=256, seed=0)['images'][0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    p = pv.watermark_payload('toy/abc')
    m = pv.embed_watermark(face, p)
    assert pv.bit_accuracy(pv.read_watermark(m), p) == 1.0
    assert pv.bit_accuracy(pv.read_watermark(np.asarray(pv.reshare(m, 'jpeg', 70))), p) >= 0.9
    w = pv.course_watermark(pv.read_watermark(m))
    assert w['present'] and w['id'] == pv.course_watermark(p)['id']
    assert not pv.course_watermark(1 - p)['present']
    with pytest.raises(pv.WatermarkSizeError, match=r'128×128.*minimum is 256×256'): pv.read_watermark(face[:128, :128])
    with pytest.raises(ValueError, match='32 bits'): pv.embed_watermark(face, p[:8])


def test_verify_outcomes_and_exit_codes(signed, root):
    (root / 'n.txt').write_text('hi'); (root / 'junk.png').write_bytes(b'not a png')
    plain = write_png(root / 'plain.png', _img(3))
    data = bytearray(signed.read_bytes())                  # a corrupt manifest in a readable PNG: break the box, fix the CRC
    pos = 8
    while data[pos + 4:pos + 8] != b'caBX': pos += 12 + struct.unpack('>I', data[pos:pos + 4])[0]
    n = struct.unpack('>I', data[pos:pos + 4])[0]
    data[pos + 8 + 40:pos + 8 + 120] = b'\xff' * 80
    data[pos + 8 + n:pos + 12 + n] = struct.pack('>I', zlib.crc32(bytes(data[pos + 4:pos + 8 + n])))
    (root / 'corrupt.png').write_bytes(bytes(data))
    out = {p: pv.verify_file(root / p) for p in ('fake.png', 'plain.png', 'n.txt', 'junk.png', 'corrupt.png', 'missing.png')}
    assert {k: v['outcome'] for k, v in out.items()} == {'fake.png': 'valid', 'plain.png': 'no-manifest', 'n.txt': 'error',
                                                          'junk.png': 'error', 'corrupt.png': 'invalid', 'missing.png': 'error'}
    assert 'not a media file' in out['n.txt']['error'] and 'does not exist' in out['missing.png']['error']
    assert out['corrupt.png']['error']
    assert pv.verify_exit_code([out['fake.png']]) == 0
    assert pv.verify_exit_code([out['fake.png'], out['plain.png']]) == 1
    assert pv.verify_exit_code([out['plain.png'], out['corrupt.png']]) == 2


def test_cli_verify(signed, root):
    from deepfake_course.cli import main
    plain = write_png(root / 'plain2.png', _img(4))
    with contextlib.redirect_stdout(io.StringIO()) as buf: assert main(['verify', str(signed), '--json']) == 0
    r = json.loads(buf.getvalue())
    assert len(r) == 1 and r[0]['c2pa']['claims']['method'] == 'toy' and r[0]['tag']['method'] == 'toy'
    with contextlib.redirect_stdout(io.StringIO()) as buf: assert main(['verify', str(signed), str(plain)]) == 1
    assert 'signer untrusted' in buf.getvalue() and 'C2PA manifest: none' in buf.getvalue()
    (root / 'note.txt').write_text('x')
    with contextlib.redirect_stdout(io.StringIO()) as buf: assert main(['verify', str(root / 'note.txt'), str(signed)]) == 2
    assert buf.getvalue().count('\n') >= 2 and 'VALID' in buf.getvalue()      # it went on to the next file


def test_fake_set_writer_signs_and_says_so_on_card(tmp_path, monkeypatch):
    from deepfake_course.data.fakes import FakeSetWriter, read_card, read_fake_set
    monkeypatch.delenv('DFC_C2PA', raising=False)
    w = FakeSetWriter('toy-sign', dict(n=1), tmp_path)
    with w:
        w.add_image(_img(5, 16, 16), split='train', identity=0)
        w.add_clip(_img(6, 16, 16)[None].repeat(3, 0), split='test', name='c0', identity=1)
    card = read_card(w.path)
    assert card['c2pa']['signed'] and card['c2pa']['files_signed'] == 2
    for p in read_fake_set(w.name, tmp_path).path:
        r = pv.read_c2pa(p)
        assert r['valid'] and r['claims']['fake_set'] == w.name and read_provenance(p)['fake_set'] == w.name
    monkeypatch.setenv('DFC_C2PA', '0')
    w2 = FakeSetWriter('toy-sign', dict(n=2), tmp_path)
    with w2: w2.add_image(_img(7, 16, 16), split='train', identity=0)
    assert read_card(w2.path)['c2pa'] == dict(signed=False, files_signed=0, why='off ($DFC_C2PA)')
    assert pv.read_c2pa(read_fake_set(w2.name, tmp_path).path[0])['status'] == 'none'
    monkeypatch.setenv('DFC_C2PA', 'yes')
    with pytest.raises(ValueError, match='DFC_C2PA'): FakeSetWriter('toy-sign', dict(n=3), tmp_path)
