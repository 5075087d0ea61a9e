import json

import pytest

from pipelines.application.manifest import image_jobs, read_manifest, rows_from


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_rows_set_prompts_seeds_counts_and_guidance(tmp_path):
    manifest = write(
        tmp_path / "m.jsonl",
        [
            json.dumps({"prompt": "a red circle", "seed": 100, "num_images": 2}),
            "",
            json.dumps({"prompt": "a blue square", "negative_prompt": "green", "guidance": "ag", "threshold": 0.9}),
            json.dumps({"prompt": "a cat", "guidance": "dynamic", "candidates": [1, 5], "evaluator": "clip"}),
        ],
    )
    rows = read_manifest(manifest)
    assert [(r.row, r.line) for r in rows] == [(0, 1), (1, 3), (2, 4)]
    assert rows[1].negative_prompt == "green" and dict(rows[1].guidance) == {"guidance": "ag", "threshold": 0.9}
    assert dict(rows[2].guidance) == {"candidates": (1.0, 5.0), "evaluator": ("clip",), "guidance": "dynamic"}
    jobs = image_jobs(rows, seed=7, guidance={"guidance_scale": 5, "guidance": "cfg"}, negative_prompt="blurry")
    assert [(j.index, j.row, j.image, j.seed) for j in jobs] == [
        (0, 0, 0, 100),
        (1, 0, 1, 101),
        (2, 1, 0, 9),
        (3, 2, 0, 10),
    ]
    assert [j.negative_prompt for j in jobs] == ["blurry", "blurry", "green", "blurry"]
    assert jobs[0].guidance_options == {"guidance": "cfg", "guidance_scale": 5.0}
    assert jobs[2].guidance_options == {"guidance": "ag", "guidance_scale": 5.0, "threshold": 0.9}  # row overrides run
    assert jobs[3].guidance_options["candidates"] == [1.0, 5.0]
    assert jobs[0].group == jobs[1].group != jobs[2].group


def test_csv_and_prompt_files(tmp_path):
    csv = write(tmp_path / "m.csv", ["prompt,seed,num_images,guidance_scale,candidates", "a red circle,3,2,4.5,1 7.5"])
    (row,) = read_manifest(csv)
    assert (row.prompt, row.seed, row.num_images) == ("a red circle", 3, 2)
    assert dict(row.guidance) == {"candidates": (1.0, 7.5), "guidance_scale": 4.5}
    excel = tmp_path / "excel.csv"
    excel.write_bytes("\ufeffprompt,seed\r\na red circle,4\r\n".encode())
    assert [(r.prompt, r.seed) for r in read_manifest(excel)] == [("a red circle", 4)]
    separators = write(tmp_path / "s.jsonl", [json.dumps({"prompt": "a\u2028b\x85c"}, ensure_ascii=False)])
    assert read_manifest(separators)[0].prompt == "a\u2028b\x85c"
    text = write(tmp_path / "prompts.txt", ["one", "  ", "two"])
    assert [(r.prompt, r.line) for r in read_manifest(text)] == [("one", 1), ("two", 3)]
    assert [r.prompt for r in rows_from(["x", {"prompt": "y", "seed": 2}])] == ["x", "y"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps({"seed": 1})], r"m.jsonl: row 0 \(line 1\): `prompt` must be a non-empty string, got None"),
        (
            ['{"prompt": "a"}', json.dumps({"prompt": "b", "seed": "x1"})],
            r"row 1 \(line 2\): `seed` must be an int, got str .x1.",
        ),
        ([json.dumps({"prompt": "a", "seed": 1.5})], r"`seed` must be an int, got float 1.5"),
        (
            [json.dumps({"prompt": "a", "seed": -3})],
            r"row 0 \(line 1\): `seed` must be an int in \[0, 9223372036854775807\]",
        ),
        ([json.dumps({"prompt": "a", "num_images": 0})], r"`num_images` must be an int >= 1, got 0"),
        ([json.dumps({"prompt": "a", "guidance": "magic"})], r"`guidance` must be one of \['cfg', 'scheduled'"),
        (
            [json.dumps({"prompt": "a", "sampler": "ddim"})],
            r"row 0 \(line 1\): unknown field 'sampler'; a row may set",
        ),
        ([json.dumps({"prompt": "a", "guidance_scale": "high"})], r"`guidance_scale` must be a number, got 'high'"),
        ([json.dumps({"prompt": "a", "negative_prompt": 3})], r"`negative_prompt` must be a string, got 3"),
        (['{"prompt": "a"}', '{"prompt": "b",'], r"m.jsonl: line 2 is not valid JSON"),
        (['["a"]'], r"line 1 must be a JSON object, got list"),
        ([""], r"holds no rows"),
    ],
)
def test_bad_rows_name_the_row_and_the_field(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_manifest(write(tmp_path / "m.jsonl", lines))


def test_a_row_option_its_method_does_not_read_is_refused(tmp_path):
    rows = rows_from([{"prompt": "a", "guidance": "dynamic", "threshold": 0.9}])
    with pytest.raises(ValueError, match=r"`threshold` is not an option of guidance 'dynamic', which takes"):
        image_jobs(rows, seed=0)
    rows = rows_from([{"prompt": "a", "threshold": 0.9}])
    assert image_jobs(rows, seed=0, guidance={"guidance": "ag"})[0].guidance_options["threshold"] == 0.9
    with pytest.raises(ValueError, match=r"row 0 \(line 1\): `threshold` is not an option of guidance 'cfg'"):
        image_jobs(rows, seed=0)


def test_bad_files_and_values(tmp_path):
    with pytest.raises(ValueError, match=r"the name must end in .jsonl .*, .csv .* or .txt .*, got '.json'"):
        read_manifest(write(tmp_path / "rows.json", ['{"prompt": "a"}']))
    with pytest.raises(ValueError, match="`manifest` '/no/such.jsonl' does not exist"):
        read_manifest("/no/such.jsonl")
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"`--manifest` '.*rows.jsonl' is a folder, expected a file"):
        read_manifest(tmp_path / "rows.jsonl", "--manifest")
    with pytest.raises(ValueError, match="line 2: more cells than the header names"):
        read_manifest(write(tmp_path / "m.csv", ["prompt", "a,b"]))
    with pytest.raises(ValueError, match=r"row 0 \(line 2\): `seed` must be an int, got str 'x'"):
        read_manifest(write(tmp_path / "n.csv", ["prompt,seed", "a,x"]))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"`manifest` '.*bin.jsonl' is not UTF-8 text \(byte 0 is 0xff\): expected a"):
        read_manifest(tmp_path / "bin.jsonl")
    with pytest.raises(TypeError, match="`manifest` must be a file path or a non-empty list"):
        rows_from([])
    with pytest.raises(TypeError, match="items must be prompts"):
        rows_from([3])
