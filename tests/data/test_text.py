"""Reading corpora, training tokenizers, packing blocks and NSP pairs, on tiny corpora."""

import gzip
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

from pretune.data.builtin import load_stdlib_docstrings, stdlib_topics  # noqa: E402
from pretune.data.text import (  # noqa: E402
    AUTO_LINES, build_text_data, get_tokenizer, load_documents, pack_blocks, sentence_pair_blocks, split_documents, text_reading,
)
from pretune.errors import DataError  # noqa: E402
from pretune.recipe import DataConfig, TokenizerConfig  # noqa: E402

datasets.disable_progress_bars()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


@pytest.fixture
def cfg(tmp_path):
    def make(**fields):
        return DataConfig(cache_dir=str(tmp_path / "cache"), **fields)
    return make


def texts(documents):
    return list(documents["text"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def corpus(count, seed=0, low=3, high=12):
    rng = random.Random(seed)
    return datasets.Dataset.from_dict(
        {"text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "." for _ in range(count)]}
    )


# ---------------------------------------------------------------------------- reading


def test_text_file_paragraphs_are_documents(tmp_path, cfg):
    path = tmp_path / "notes.txt"
    path.write_text("First para\nstill first.\n\n\n\nSecond.\n  \t\nThird\r\n\r\nFourth\n\n   \n", encoding="utf-8")
    assert texts(load_documents(cfg(files=str(path)))) == ["First para\nstill first.", "Second.", "Third", "Fourth"]


def sentences(count):
    return [f"sentence number {i} of the corpus." for i in range(count)]


def test_one_sentence_per_line_file_is_one_document_per_line(tmp_path, cfg, capsys):
    """A 117k-line corpus of one sentence per line used to be one document, so its validation split was empty."""
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(sentences(AUTO_LINES)) + "\n\n", encoding="utf-8")  # trailing blank lines do not count
    assert texts(load_documents(cfg(files=str(path)))) == sentences(AUTO_LINES)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "lines.txt" in note[0] and "one document per line" in note[0] and "data.document=paragraph" in note[0]
    # the other readings, chosen explicitly, print nothing
    assert texts(load_documents(cfg(files=str(path), document="file"))) == ["\n".join(sentences(AUTO_LINES))]
    assert texts(load_documents(cfg(files=str(path), document="paragraph"))) == ["\n".join(sentences(AUTO_LINES))]
    assert capsys.readouterr().err == ""
    # streaming reads the same documents
    assert texts(load_documents(cfg(files=str(path), streaming=True))) == sentences(AUTO_LINES)


def test_document_readings(tmp_path, cfg, capsys):
    short = tmp_path / "short.txt"  # fewer lines than AUTO_LINES, no blank line: paragraphs, as before (one document)
    short.write_text("\n".join(sentences(AUTO_LINES - 1)), encoding="utf-8")
    paragraphs = tmp_path / "paragraphs.txt.gz"  # many lines, one blank line among them: paragraphs
    with gzip.open(paragraphs, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(sentences(60)) + "\n  \n" + "\n".join(sentences(60)))
    assert text_reading(str(short)) == "paragraph" and text_reading(str(paragraphs)) == "paragraph"
    assert len(load_documents(cfg(files=str(paragraphs)))) == 2
    assert len(load_documents(cfg(files=str(paragraphs), document="line"))) == 120
    assert len(load_documents(cfg(files=str(short), document="line"))) == AUTO_LINES - 1
    assert capsys.readouterr().err == ""
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(sentences(AUTO_LINES)), encoding="utf-8")
    assert text_reading(str(lines)) == "line" and text_reading(str(lines), "file") == "file"
    assert text_reading(str(lines), nsp=True) == "paragraph"  # next-sentence pairs need several sentences per document
    # a folder mixing both: each file read its own way, in file order
    docs = texts(load_documents(cfg(files=[str(lines), str(paragraphs), str(short)])))
    assert docs[:AUTO_LINES] == sentences(AUTO_LINES) and len(docs) == AUTO_LINES + 2 + 1


def test_a_corpus_of_one_document_warns_that_there_is_no_validation(tmp_path, cfg, capsys):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(WORDS * 20), encoding="utf-8")
    data = build_text_data(cfg(files=str(path), block_size=16, tokenizer={"vocab_size": 100}), family="encoder", nsp=False, seed=0)
    assert data.validation is None
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("pretune: warning: no validation set") and "data.validation_files" in warning[0]
    build_text_data(cfg(files=str(path), block_size=16, validation=0, tokenizer={"vocab_size": 100}), family="encoder", nsp=False, seed=0)
    assert "warning" not in capsys.readouterr().err  # no validation asked for: nothing to say


def test_sentence_per_line_corpus_gets_a_validation_split(tmp_path, cfg, capsys):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"{' '.join(random.Random(i).choices(WORDS, k=8))}." for i in range(200)), encoding="utf-8")
    data = build_text_data(cfg(files=str(path), block_size=16, tokenizer={"vocab_size": 100}), family="encoder", nsp=False, seed=0)
    assert data.documents == 200 and data.validation is not None and len(data.validation) > 0
    assert "no validation" not in capsys.readouterr().err


def test_jsonl_csv_parquet_read_the_column(tmp_path, cfg):
    rows = [{"id": 1, "body": "one doc"}, {"id": 2, "body": "  "}, {"id": 3, "body": None}, {"id": 4, "body": "two, \"quoted\""}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "b.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    for name in ["a.jsonl", "b.csv", "c.parquet"]:
        assert texts(load_documents(cfg(files=str(tmp_path / name), column="body"))) == ["one doc", 'two, "quoted"'], name


def test_folders_globs_and_gzip(tmp_path, cfg):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n\nbee two", encoding="utf-8")
    write_jsonl(folder / "sub" / "a.jsonl", [{"text": "from json"}])
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    (folder / ".hidden.txt").write_text("hidden", encoding="utf-8")
    with gzip.open(folder / "sub" / "z.txt.gz", "wt", encoding="utf-8") as out:
        out.write("zipped one\n\nzipped two")
    assert texts(load_documents(cfg(files=str(folder)))) == ["bee", "bee two", "from json", "zipped one", "zipped two"]
    assert texts(load_documents(cfg(files=[str(folder / "**" / "*.txt*")]))) == ["bee", "bee two", "zipped one", "zipped two"]
    assert texts(load_documents(cfg(files=str(folder), max_documents=3))) == ["bee", "bee two", "from json"]


def test_streaming_gives_the_same_documents(tmp_path, cfg):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "four"}, {"text": ""}, {"text": "five"}])
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    eager = texts(load_documents(cfg(files=files)))
    assert eager == ["one", "two", "three", "four", "five"]
    assert texts(load_documents(cfg(files=files, streaming=True))) == eager
    assert texts(load_documents(cfg(files=files, streaming=True, max_documents=4))) == eager[:4]


def test_default_is_the_embedded_corpus(cfg):
    documents = load_documents(cfg(max_documents=50))
    assert documents.column_names == ["text"] and len(documents) == 50


def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n \n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("ok\nfine\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"line\nline\n\x00\x01\x02")
    write_jsonl(tmp_path / "nocol.jsonl", [{"body": "x", "id": 1}])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "nocol.csv").write_text("title,body\na,b\n", encoding="utf-8")
    datasets.Dataset.from_dict({"body": ["x"]}).to_parquet(str(tmp_path / "nocol.parquet"))
    (tmp_path / "fake.parquet").write_text("not parquet", encoding="utf-8")
    write_jsonl(tmp_path / "numbers.jsonl", [{"text": 1}, {"text": 2}])
    (tmp_path / "data.xml").write_text("<a/>", encoding="utf-8")
    (tmp_path / "ragged.csv").write_text("text\na\n\"b,c\nd", encoding="utf-8")
    return [
        ("missing/*.txt", "missing/*.txt", None),
        ("nothing.txt", "nothing.txt", None),
        ("empty.txt", "empty.txt", "empty"),
        ("blank.txt", "blank.txt", "no non-empty document"),
        ("latin.txt", "latin.txt", "line 3"),
        ("binary.txt", "binary.txt", "line 3"),
        ("nocol.jsonl", "nocol.jsonl", "'body', 'id'"),
        ("broken.jsonl", "broken.jsonl", "line 2"),
        ("nocol.csv", "nocol.csv", "'title', 'body'"),
        ("nocol.parquet", "nocol.parquet", "'body'"),
        ("fake.parquet", "fake.parquet", "Parquet"),
        ("numbers.jsonl", "numbers.jsonl", "not text"),
        ("data.xml", "data.xml", "unsupported"),
        ("ragged.csv", "ragged.csv", None),
    ]


def test_bad_inputs_raise_one_line_data_errors(tmp_path, cfg):
    for name, expected, detail in bad_inputs(tmp_path):
        with pytest.raises(DataError) as info:
            load_documents(cfg(files=str(tmp_path / name)))
        message = str(info.value)
        assert "\n" not in message and expected in message, (name, message)
        assert detail is None or detail in message, (name, message)


def test_streaming_errors_are_data_errors_too(tmp_path, cfg):
    write_jsonl(tmp_path / "late.jsonl", [{"text": "a"}] * 3)
    with open(tmp_path / "late.jsonl", "a") as out:
        out.write('{"text": broken}\n')
    with pytest.raises(DataError, match="late.jsonl"):
        load_documents(cfg(files=str(tmp_path / "late.jsonl"), streaming=True))


# ---------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("family,kind", [("encoder", "auto"), ("decoder", "auto"), ("encoder", "bpe"), ("decoder", "wordpiece")])
def test_tokenizer_round_trips_and_has_special_ids(tmp_path, family, kind):
    documents = corpus(200)
    tokenizer = get_tokenizer(TokenizerConfig(kind=kind, vocab_size=300), documents, family)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    sample = ["alpha gamma betadelta, unseen words!", "pi rho"]
    assert loaded(*sample)["input_ids"] == tokenizer(*sample)["input_ids"]
    assert get_tokenizer(TokenizerConfig(path=str(tmp_path / "tok")), documents, family).get_vocab() == tokenizer.get_vocab()
    names = ["cls", "sep", "mask", "pad"] if family == "encoder" else ["eos", "pad"]
    ids = [getattr(loaded, f"{name}_token_id") for name in names]
    assert None not in ids
    if family == "encoder":
        assert len(set(ids)) == 4
        encoded = loaded("alpha", "beta")
        assert encoded["input_ids"][0] == loaded.cls_token_id and encoded["input_ids"].count(loaded.sep_token_id) == 2
        assert "token_type_ids" in encoded and encoded["token_type_ids"][-1] == 1


def test_tokenizer_training_is_deterministic():
    documents = corpus(300, seed=1)
    for kind in ["wordpiece", "bpe"]:
        vocabs = [get_tokenizer(TokenizerConfig(kind=kind, vocab_size=200), documents, "encoder").get_vocab() for _ in range(3)]
        assert vocabs[0] == vocabs[1] == vocabs[2], kind


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        get_tokenizer(TokenizerConfig(path=str(tmp_path / "none")), corpus(5), "encoder")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(DataError, match="junk"):
        get_tokenizer(TokenizerConfig(path=str(tmp_path / "junk")), corpus(5), "encoder")
    gpt = get_tokenizer(TokenizerConfig(vocab_size=300), corpus(50), "decoder")
    gpt.save_pretrained(tmp_path / "gpt")
    with pytest.raises(DataError, match="mask_token"):
        get_tokenizer(TokenizerConfig(path=str(tmp_path / "gpt")), corpus(5), "encoder")


# ---------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_pack_blocks_is_the_exact_token_stream(family):
    documents = corpus(2500, low=1, high=6)  # more documents than one map batch (1000)
    tokenizer = get_tokenizer(TokenizerConfig(vocab_size=200), documents, family)
    separator = tokenizer.sep_token_id if family == "encoder" else tokenizer.eos_token_id
    stream = []
    for ids in tokenizer(texts(documents), add_special_tokens=False)["input_ids"]:
        stream += ids + [separator]
    blocks = list(pack_blocks(documents, tokenizer, 16, family)["input_ids"])
    piece = 15 if family == "encoder" else 16
    assert len(blocks) == len(stream) // piece
    assert all(len(block) == 16 for block in blocks)
    if family == "encoder":
        assert all(block[0] == tokenizer.cls_token_id for block in blocks)
        blocks = [block[1:] for block in blocks]
        assert all(tokenizer.pad_token_id not in block for block in blocks)
    assert [t for block in blocks for t in block] == stream[: len(blocks) * piece]


def test_pack_blocks_too_small_corpus():
    documents = corpus(3, low=2, high=2)
    tokenizer = get_tokenizer(TokenizerConfig(vocab_size=100), documents, "decoder")
    with pytest.raises(DataError, match=r"\d+ tokens.*block_size 512"):
        pack_blocks(documents, tokenizer, 512, "decoder")


def numbered_corpus(documents=50, sentences=20):
    """Document d, sentence k reads ``dDsK`` plus filler words; every sentence is identifiable."""
    rng = random.Random(7)
    rows = []
    for d in range(documents):
        parts = [f"d{d}s{k} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + rng.choice(".!?")
                 for k in range(sentences)]
        rows.append(" ".join(parts[:10]) + "\n" + " ".join(parts[10:]))
    return datasets.Dataset.from_dict({"text": rows})


def find(part, whole):
    return [i for i in range(len(whole) - len(part) + 1) if whole[i : i + len(part)] == part]


def test_sentence_pairs_follow_bert():
    documents = numbered_corpus()
    tokenizer = get_tokenizer(TokenizerConfig(vocab_size=400), documents, "encoder")
    pairs = sentence_pair_blocks(documents, tokenizer, 32, seed=3)
    assert sentence_pair_blocks(documents, tokenizer, 32, seed=3)[:] == pairs[:]
    assert sentence_pair_blocks(documents, tokenizer, 32, seed=4)[:] != pairs[:]
    streams = [tokenizer(text.split("\n"), add_special_tokens=False)["input_ids"] for text in documents["text"]]
    streams = [line[0] + line[1] for line in streams]
    labels = list(pairs["next_sentence_label"])
    assert len(labels) > 300 and 0.4 <= sum(labels) / len(labels) <= 0.6
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    checked = 0
    for row in pairs:
        ids, types, mask = row["input_ids"], row["token_type_ids"], row["attention_mask"]
        assert len(ids) == len(types) == len(mask) == 32
        real = sum(mask)
        assert mask == [1] * real + [0] * (32 - real) and ids[real:] == [pad] * (32 - real)
        first, second = [i for i, t in enumerate(ids) if t == sep]
        assert ids[0] == cls and second == real - 1
        assert types == [0] * (first + 1) + [1] * (second - first) + [0] * (32 - real)
        a, b = ids[1:first], ids[first + 1 : second]
        homes = [d for d, stream in enumerate(streams) if find(a, stream)]
        if len(homes) != 1:
            continue  # A too short to say which document it is from
        stream = streams[homes[0]]
        if row["next_sentence_label"] == 0:  # B continues A in the same document
            assert any(pb >= pa + len(a) for pa in find(a, stream) for pb in find(b, stream))
            checked += 1
    assert checked > 100


def test_sentence_pairs_skip_empty_documents():
    documents = datasets.Dataset.from_dict({"text": ["alpha beta. gamma delta!", "\u200b", "pi rho. tau mu."]})
    tokenizer = get_tokenizer(TokenizerConfig(vocab_size=100), documents, "encoder")
    pairs = sentence_pair_blocks(documents, tokenizer, 16, seed=0)
    assert len(pairs) >= 2 and set(pairs["next_sentence_label"]) <= {0, 1}


# ---------------------------------------------------------------------------- builtin and splits


def test_builtin_corpus():
    documents = load_stdlib_docstrings()
    assert len(documents) > 4000 and documents.column_names == ["text", "package", "kind"]
    assert all(len(text) >= 40 for text in documents["text"])
    assert {"asyncio", "email", "os"} <= set(documents["package"]) and set(documents["kind"]) == {"module", "class", "function"}
    topics = stdlib_topics(min_count=100, max_classes=5)
    assert topics.column_names == ["text", "label"] and len(set(topics["label"])) == 5


def test_split_is_by_document_and_seeded():
    documents = corpus(100)
    documents = documents.add_column("id", list(range(100)))
    train, validation = (list(part["id"]) for part in split_documents(documents, 0.1, seed=5))
    again = list(split_documents(documents, 0.1, seed=5)[1]["id"])
    other = list(split_documents(documents, 0.1, seed=6)[1]["id"])
    assert len(validation) == 10 and validation == again and validation != other
    assert sorted(train + validation) == list(range(100)) and train == sorted(train)
    assert len(split_documents(documents.select([0, 1]), 0.01, seed=0)[1]) == 1
    assert split_documents(documents, 0.0, seed=0)[1] is None


def test_build_text_data(tmp_path, cfg):
    write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in corpus(300)["text"]])
    write_jsonl(tmp_path / "valid.jsonl", [{"text": text} for text in corpus(40, seed=9)["text"]])
    small = {"vocab_size": 200}
    train = str(tmp_path / "train.jsonl")
    data = build_text_data(cfg(files=train, block_size=16, tokenizer=small), family="encoder", nsp=False, seed=0)
    assert data.documents == 300 and data.tokens == 16 * len(data.train) and len(data.validation) > 0
    data = build_text_data(
        cfg(files=str(tmp_path / "train.jsonl"), validation_files=str(tmp_path / "valid.jsonl"), block_size=16, tokenizer=small),
        family="decoder", nsp=False, seed=0,
    )
    assert data.documents == 340 and data.tokenizer.eos_token_id is not None
    data = build_text_data(cfg(files=str(tmp_path / "train.jsonl"), validation=0, block_size=16, tokenizer=small),
                           family="encoder", nsp=True, seed=0)
    assert data.validation is None and data.tokens == sum(map(sum, data.train["attention_mask"]))
    with pytest.raises(DataError, match="validation"):
        build_text_data(cfg(files=str(tmp_path / "train.jsonl"), validation=0.01, block_size=512, tokenizer=small),
                        family="decoder", nsp=False, seed=0)
