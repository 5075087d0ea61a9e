from guidance.shapes.tokenizer import MAX_LENGTH, world_tokenizer
from guidance.shapes.world import ShapesWorld


def test_every_world_word_is_one_token_and_any_text_tokenizes(tmp_path):
    tokenizer = world_tokenizer()
    for word in ShapesWorld().words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a small red circle at the left on white").input_ids
    assert len(ids) == 11 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # CLIP pools at the largest id
    assert len(tokenizer("zebra!").input_ids) > 3  # unknown words fall back to bytes
    assert tokenizer.model_max_length == MAX_LENGTH
    tokenizer.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path)("a red square").input_ids == tokenizer("a red square").input_ids
