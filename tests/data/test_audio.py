"""The audio reader: decoding, resampling, cropping, Whisper's log-mel, listing and skipping."""

import json

import numpy as np
import pytest
import soundfile
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from pretune.data.audio import (AudioSpec, clips_from_arrays, is_audio_file, list_audio, load_audio_files,
                                load_clip, log_mel, read_audio)
from pretune.errors import DataError, RecipeError

SPEC = AudioSpec()  # 16 kHz, 1 s, 80 mels


def tone(freq=1000.0, rate=16000, seconds=1.0, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def write(path, wave, rate=16000, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, rate, **kw)
    return path


def test_spec_frames_are_even_and_whole():
    assert (SPEC.frames, SPEC.samples) == (100, 16000)
    odd = AudioSpec(duration=1.01)  # 16160 samples = 101 frames -> 102 frames, 16320 samples
    assert (odd.frames, odd.samples) == (102, 16320)
    with pytest.raises(RecipeError, match="too short"):
        AudioSpec(duration=0.005)


@pytest.mark.parametrize("name, kw", [
    ("tone.wav", {}), ("tone.flac", {}), ("tone.ogg", {}),
    ("tone.opus", {"format": "OGG", "subtype": "OPUS"}), ("tone.mp3", {"format": "MP3"}),
])
def test_decode_resample_and_mel_peak(tmp_path, name, kw):
    path = write(tmp_path / name, tone(rate=8000), rate=8000, **kw)
    wave = load_clip(path, SPEC)
    assert wave.shape == (SPEC.samples,) and wave.dtype == np.float32
    assert np.abs(np.fft.rfft(wave)).argmax() * SPEC.sample_rate / len(wave) == pytest.approx(1000, abs=2)
    # filter centres at 1 Hz resolution: each filter's peak on a fine frequency grid
    fine = mel_filter_bank(num_frequency_bins=8001, num_mel_filters=80, min_frequency=0, max_frequency=8000,
                           sampling_rate=16000, norm="slaney", mel_scale="slaney")
    centres = fine.argmax(axis=0)  # Hz: bin i is i Hz
    features = log_mel(torch.from_numpy(wave)[None], SPEC)
    assert features.shape == (1, 80, SPEC.frames)
    assert features[0].mean(dim=1).argmax().item() == np.abs(centres - 1000).argmin()


def test_log_mel_matches_whisper_feature_extractor():
    rng = np.random.default_rng(0)
    waves = np.stack([tone(440) + 0.1 * rng.standard_normal(16000).astype(np.float32),
                      0.01 * rng.standard_normal(16000).astype(np.float32)])
    extractor = WhisperFeatureExtractor(feature_size=80)
    ours = log_mel(torch.from_numpy(waves), SPEC).numpy()
    assert np.abs(ours - extractor._torch_extract_fbank_features(waves)).max() < 1e-4
    assert np.abs(ours - extractor._np_extract_fbank_features(waves, "cpu")).max() < 1e-4
    # the public call pads to 30 s; the clip's frames away from its end agree (the clamp is not reached here)
    padded = extractor(waves[0], sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.abs(ours[0, :, :90] - padded[:, :90]).max() < 1e-4


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(440), tone(1500, amplitude=0.25)
    path = write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    np.testing.assert_allclose(load_clip(path, SPEC), (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("length", [16000 + 1001, 8000])
def test_long_clips_are_centre_cropped_and_short_padded_at_the_end(tmp_path, length):
    ramp = np.linspace(-0.5, 0.5, length, dtype=np.float32)
    wave = load_clip(write(tmp_path / "ramp.wav", ramp, subtype="FLOAT"), SPEC)
    if length > SPEC.samples:
        np.testing.assert_array_equal(wave, ramp[500:500 + SPEC.samples])
    else:
        np.testing.assert_array_equal(wave[:length], ramp)
        assert not wave[length:].any()


def test_clips_from_arrays_reads_like_files(tmp_path):
    stereo = np.stack([tone(rate=8000), tone(300, rate=8000)], axis=1)
    wave = load_clip(write(tmp_path / "a.wav", stereo, 8000, subtype="FLOAT"), SPEC)
    from_file = log_mel(torch.from_numpy(wave)[None], SPEC)
    from_arrays = clips_from_arrays([stereo, (stereo * 32767).astype(np.int16)], 8000, SPEC)
    assert from_arrays.shape == (2, 80, SPEC.frames)
    torch.testing.assert_close(from_arrays[:1], from_file)
    # int16 is scaled like soundfile scales it (a wrong scale would shift the features by > 2)
    torch.testing.assert_close(from_arrays[1], from_file[0], atol=0.05, rtol=0)
    with pytest.raises(DataError, match=r"array 1 has shape \(2, 8000\)"):
        clips_from_arrays([stereo.T], 8000, SPEC)


def test_folder_with_class_folders_gives_keys(tmp_path):
    for name in ("no/a.wav", "yes/b.flac", "yes/deep/c.wav", "yes/.hidden.wav", ".cache/d.wav"):
        write(tmp_path / name, tone())
    (tmp_path / "notes.txt").write_text("not audio")
    paths, keys = list_audio(str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["no/a.wav", "yes/b.flac", "yes/deep/c.wav"]
    assert keys == ["no", "yes", "yes"]
    assert is_audio_file(tmp_path / "no" / "a.wav") and not is_audio_file(tmp_path / "notes.txt")
    assert not is_audio_file(tmp_path / "yes" / ".hidden.wav")


def test_flat_folder_is_unlabelled(tmp_path):
    write(tmp_path / "b.wav", tone()), write(tmp_path / "a.ogg", tone())
    paths, keys = list_audio(str(tmp_path))
    assert [p.name for p in paths] == ["a.ogg", "b.wav"] and keys is None


def test_mixed_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"no audio files \(\.wav.*\) in"):
        list_audio(str(tmp_path))
    write(tmp_path / "a.wav", tone()), write(tmp_path / "yes" / "b.wav", tone())
    with pytest.raises(DataError, match="both audio files"):
        list_audio(str(tmp_path))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_manifest_with_relative_paths(tmp_path, suffix):
    write(tmp_path / "clips" / "a.wav", tone()), write(tmp_path / "clips" / "b.wav", tone(300))
    rows = [{"path": "clips/b.wav", "label": "no"}, {"path": str(tmp_path / "clips" / "a.wav"), "label": 1}]
    if suffix == ".jsonl":
        text = "\n".join(json.dumps(row) for row in rows) + "\n\n"
    else:
        sep = "\t" if suffix == ".tsv" else ","
        text = f"path{sep}label\n" + "".join(f"{row['path']}{sep}{row['label']}\n" for row in rows)
    manifest = tmp_path / f"manifest{suffix}"
    manifest.write_text(text)
    paths, keys = list_audio(str(manifest))
    assert paths == [tmp_path / "clips" / "b.wav", tmp_path / "clips" / "a.wav"] and keys == ["no", "1"]
    x, keys, kept, skipped = read_audio(str(manifest), SPEC)
    assert x.shape == (2, 80, SPEC.frames) and keys == ["no", "1"] and kept == [0, 1] and skipped == []


@pytest.mark.parametrize("name, text, match", [
    ("m.csv", "path\na.wav\nmissing.wav\n", r"m\.csv line 3: column 'path': missing\.wav does not exist"),
    ("m.jsonl", '{"path": "a.wav"}\n{"file": "a.wav"}\n', r"m\.jsonl line 2: column 'path' is empty or missing"),
    ("m.csv", "file,label\na.wav,x\n", r"m\.csv line 1: no 'path' column \(columns: file, label\)"),
    ("m.csv", "path,label\na.wav,yes\na.wav,\n", r"m\.csv line 3: column 'label' is empty"),
    ("m.csv", "path,label\n", r"m\.csv has no rows"),
])
def test_manifest_errors_name_the_row_and_column(tmp_path, name, text, match):
    write(tmp_path / "a.wav", tone())
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
        list_audio(str(tmp_path / name))


def test_bad_too_short_and_silent_clips(tmp_path):
    good = write(tmp_path / "good.wav", tone())
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(3000))
    short = write(tmp_path / "short.wav", tone(seconds=0.01))
    quiet = write(tmp_path / "quiet.wav", tone(amplitude=5e-5), subtype="FLOAT")
    paths = [corrupt, good, short, quiet]
    waves, kept, skipped = load_audio_files(paths, SPEC)
    assert waves.shape == (1, SPEC.samples) and kept == [1]
    assert skipped[0] == f"{corrupt} (cannot be decoded: Format not recognised)"
    assert skipped[1] == f"{short} (too short: 10 ms < 50 ms)"
    assert skipped[2].startswith(f"{quiet} (silent")
    assert load_audio_files(paths, SPEC, silent="keep")[1] == [1, 3]
    with pytest.raises(DataError, match=rf"{corrupt}: cannot be decoded .*bad_files: skip"):
        load_audio_files(paths, SPEC, bad_files="error")
    with pytest.raises(DataError, match=rf"no usable audio in {tmp_path}: all 2 file\(s\) skipped, e\.g\. {corrupt}"):
        load_audio_files([corrupt, short], SPEC)


def test_read_audio_keeps_keys_of_kept_clips(tmp_path):
    write(tmp_path / "no" / "a.wav", tone())
    (tmp_path / "no" / "b.wav").write_bytes(b"RIFF not really")
    write(tmp_path / "yes" / "c.flac", tone(300))
    x, keys, kept, skipped = read_audio(str(tmp_path), SPEC)
    assert x.shape == (2, 80, 100) and x.dtype == torch.float32
    assert keys == ["no", "yes"] and kept == [0, 2] and len(skipped) == 1 and "b.wav" in skipped[0]
