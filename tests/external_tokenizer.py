"""A tokenizer.json in a real checkpoint's style, for the tests that load one (tests/ is on sys.path)."""


EXTERNAL_BOS, EXTERNAL_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def write_external_tokenizer(directory, *, with_config: bool = True, vocab_size: int = 400):
    """A tokenizer.json in a real checkpoint's style (DeepSeek's special tokens at ids 0 and 1, a template
    that adds BOS, none of graphopt's specials), trained on this file's text, with transformers'
    tokenizer_config.json beside it. Returns the tokenizer.json path."""
    from pathlib import Path

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EXTERNAL_BOS, EXTERNAL_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([Path(__file__).read_text(encoding="utf-8")], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{EXTERNAL_BOS} $A",
                                                       special_tokens=[(EXTERNAL_BOS, 0)])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if with_config:
        import json
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": {"__type": "AddedToken", "content": EXTERNAL_BOS}, "eos_token": {"content": EXTERNAL_EOS},
            "pad_token": None}))
    return directory / "tokenizer.json"
