"""The invisible watermark, its detector and CLI, the visible badge, and MP4 provenance (issue 33)."""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatar.errors import EmoteError
from avatar.watermark import Watermarker, add_badge, default_payload, detect_file, detect_frames, write_provenance
from avatar.watermark.bench import decode, encode, half
from avatar.watermark.detect import SCALES, SCORE_THRESHOLD, null_tail
from avatar.watermark.provenance import TRAINED_ALGORITHMIC_MEDIA, read_provenance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def face_clip() -> np.ndarray:
    """One second of a procedural talking face, 256x256."""
    from avatar.data.corpus import make_clip

    return make_clip(2026, 3, 10, size=256)[1][:25]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_mark_is_invisible_by_psnr_and_leaves_the_input_alone(astronaut):
    before = astronaut.copy()
    marked = Watermarker().mark(astronaut)
    assert marked.shape == astronaut.shape and marked.dtype == np.uint8
    assert np.array_equal(astronaut, before)
    assert 40.0 <= psnr(marked, astronaut) < 45.0  # there, and within the budget
    found = detect_frames([marked])
    assert found["found"] and found["payload"] == default_payload().hex() and found["agreeing"] == 1


def test_mark_rejects_bad_frames():
    with pytest.raises(ValueError):
        Watermarker().mark(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError):
        Watermarker().mark(np.zeros((256, 256, 3), np.float32))


def test_h264_round_trip_finds_the_mark(face_clip):
    marked = np.stack([Watermarker().mark(f) for f in face_clip])
    result = detect_frames(decode(encode(marked, "libx264", crf=23)))
    assert result["found"] and result["payload"] == default_payload().hex()
    assert result["frames"] == len(face_clip) and result["agreeing"] >= len(face_clip) // 2
    assert result["confidence"] > 0.999999


def test_vp8_300k_round_trip_finds_a_custom_payload(face_clip):
    payload = b"\x12\x34\x56\x78"
    marked = np.stack([Watermarker(payload).mark(f) for f in face_clip])
    result = detect_frames(decode(encode(marked, "libvpx", bitrate=300_000)))
    assert result["found"] and result["payload"] == payload.hex()


def test_half_size_with_h264_crf28_and_a_crop_find_the_mark(face_clip, astronaut):
    marked = np.stack([Watermarker().mark(f) for f in face_clip])
    result = detect_frames(decode(encode(half(marked), "libx264", crf=28)))
    assert result["found"] and result["scale"] == 0.5
    cropped = Watermarker().mark(astronaut)[37:37 + 300, 91:91 + 350]
    assert detect_frames([cropped])["found"]


def test_unmarked_frames_and_clips_are_not_found(face_clip, astronaut):
    rng = np.random.default_rng(5)
    frames = [astronaut, astronaut[100:400, 50:300], *face_clip[::8],
              rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), np.full((256, 256, 3), 128, np.uint8)]
    for frame in frames:
        result = detect_frames([frame])
        assert not result["found"] and result["payload"] is None
        assert result["score"] < SCORE_THRESHOLD - 1.5
    assert not detect_frames(decode(encode(face_clip, "libx264", crf=23)))["found"]
    # The threshold's false-positive bound under the null, across the searched scales, per clip.
    assert len(SCALES) * null_tail(SCORE_THRESHOLD) < 1e-6


def run_detect_cli(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "avatar.watermark.cli", *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_detect_cli_reports_json_and_rejects_bad_files(tmp_path, astronaut):
    from PIL import Image

    marked, plain = tmp_path / "marked.png", tmp_path / "plain.jpg"
    Image.fromarray(Watermarker().mark(astronaut)).save(marked)
    Image.fromarray(astronaut).save(plain, quality=90)
    done = run_detect_cli(marked, plain)
    assert done.returncode == 0, done.stderr
    import json

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["found"] for line in lines] == [True, False]
    assert lines[0]["payload"] == default_payload().hex() and lines[0]["file"] == str(marked)

    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00not a video" * 50)
    for bad in (garbage, tmp_path / "missing.webm"):
        done = run_detect_cli(bad)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1 and "error" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(EmoteError):
        detect_file(garbage)


def test_badge_appears_when_asked_and_not_otherwise(astronaut):
    badged = add_badge(astronaut)
    changed = np.any(badged != astronaut, axis=2)
    ys, xs = np.nonzero(changed)
    height, width = astronaut.shape[:2]
    # Only a small box in the bottom-right corner changes, and it holds bright text on a darkened box.
    assert ys.min() > height * 0.9 and xs.min() > width * 0.6 and changed.mean() < 0.02
    gray = np.full((256, 320, 3), 128, np.uint8)
    box = add_badge(gray)[240:, 160:]
    assert (box.min(axis=2) > 200).sum() > 20  # white text
    assert (box.max(axis=2) < 80).sum() > 200  # on a darkened box
    # The mark alone adds no badge: the corner differs from the original only by the invisible offset.
    marked = Watermarker().mark(astronaut)
    assert (np.abs(marked.astype(int) - astronaut)[ys.min():, xs.min():] > 40).sum() == 0
    assert detect_frames([add_badge(marked)])["found"]


def make_test_signer(directory: Path) -> tuple[Path, Path]:
    """A throwaway root CA and an end-entity certificate (digitalSignature, emailProtection EKU, AKI)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "emote-live tests")])

    def usage(sign: bool, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    def base(subject: str, key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("throwaway root"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))

    root = (base("throwaway root", root_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(False, True), critical=True).sign(root_key, hashes.SHA256()))
    leaf = (base("emote-live test signer", leaf_key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(True, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, hashes.SHA256()))
    cert, key = directory / "chain.pem", directory / "signer.key"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + root.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key


def test_plain_tags_without_a_key(tmp_path, face_clip):
    video = tmp_path / "render.mp4"
    video.write_bytes(encode(np.stack([Watermarker().mark(f) for f in face_clip[:10]]), "libx264"))
    write_provenance(video, "pixel")
    found = read_provenance(video)
    assert found["tags"]["generator"] == "emote-live" and found["tags"]["model"] == "pixel"
    assert found["tags"]["ai_generated"] == "true"
    assert found["tags"]["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    assert found["c2pa"] is None
    assert detect_file(video)["found"]  # remuxed, not re-encoded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["render.mp4"]  # no temporary left behind
    with pytest.raises(EmoteError):
        write_provenance(video, "pixel", sign_cert=tmp_path / "chain.pem")


def test_c2pa_manifest_of_a_render_validates(tmp_path, face_clip):
    cert, key = make_test_signer(tmp_path)
    video = tmp_path / "render.mp4"
    frames = np.stack([Watermarker().mark(f) for f in face_clip[:10]])
    video.write_bytes(encode(frames, "libx264"))
    write_provenance(video, "pixel", sign_cert=cert, sign_key=key)

    found = read_provenance(video)
    store = found["c2pa"]
    assert store is not None
    results = store["validation_results"]["activeManifest"]
    passed = {item["code"] for item in results["success"]}
    assert {"claimSignature.validated", "assertion.bmffHash.match"} <= passed
    # Our throwaway root is in no trust list: that is the only failure allowed.
    assert {item["code"] for item in results.get("failure", [])} <= {"signingCredential.untrusted"}
    manifest = store["manifests"][store["active_manifest"]]
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert actions[0]["parameters"]["model"] == "pixel"
    assert found["tags"]["generator"] == "emote-live"
    assert len(decode(video.read_bytes())) == 10 and detect_file(video)["found"]

    # Changing one byte of the video breaks the hash binding.
    data = bytearray(video.read_bytes())
    mdat = data.find(b"mdat")
    data[mdat + 200] ^= 0xFF
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    failures = read_provenance(tampered)["c2pa"]["validation_results"]["activeManifest"].get("failure", [])
    assert any("Hash" in item["code"] or "hash" in item["code"] for item in failures)


def test_the_served_model_marks_every_generated_frame(astronaut):
    """`emote serve` wraps its model in WatermarkedModel: frames from any model come out marked, badge on request."""
    from avatar.frame_model import WindowRequest
    from avatar.solid_model import SolidColourModel
    from avatar.watermark.model import WatermarkedModel

    inner = SolidColourModel(width=256, height=256)
    avatar = inner.example_avatar()
    requests = [WindowRequest(avatar, np.zeros((4, 5, 1), np.float32), np.ones(4, bool), np.ones(4, np.float32),
                              None, 0, index) for index in range(13)]
    plain = [f for w in inner.generate(requests, 1).windows for f in w.frames]
    model = WatermarkedModel(inner)
    result = model.generate(requests, 1)
    marked = [f for w in result.windows for f in w.frames]
    assert result.timings["watermark"] > 0 and result.fixed_seconds >= result.timings["watermark"]
    assert not detect_frames(plain)["found"]
    found = detect_frames(marked)
    assert found["found"] and found["payload"] == default_payload(inner.spec.name).hex()
    badged = WatermarkedModel(inner, badge=True).generate(requests[:1], 1).windows[0].frames[0]
    assert np.abs(badged.astype(int) - marked[0].astype(int)).max() > 50  # the badge's text is drawn
