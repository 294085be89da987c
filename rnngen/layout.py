"""The model directory's file names: one place that says what a model directory holds.

    config.json          what the model is and how it was trained (modeldir.py)
    model.safetensors    the weights (modeldir.py)
    vocab.json           char tokenizer  | tokenizer.model  SentencePiece tokenizer (tokenizer.py)
    ngram.safetensors    the training text's ids for the Kneser-Ney n-gram (ngram.py)
    novelty.safetensors  the copy-check index of the training text (novelty.py)
    trainer.pt           optimizer, schedule, data position and random state, to resume (training.py)
    metrics.jsonl        one line per validation (training.py)
    tokens/              the token cache, rebuilt when missing (tokencache.py)
    train.lock           the OS lock of the run writing the directory
    .rnngen-new/         a fresh run's files until its first complete save (modeldir.py)
"""

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHAR_FILE = "vocab.json"
SPM_FILE = "tokenizer.model"
NGRAM_FILE = "ngram.safetensors"
INDEX_FILE = "novelty.safetensors"
TRAINER_FILE = "trainer.pt"
METRICS_FILE = "metrics.jsonl"
TOKENS_DIR = "tokens"
LOCK_FILE = "train.lock"
STAGING_DIR, COMPLETE_MARK = ".rnngen-new", "complete.json"

MODEL_FILES = (CONFIG_FILE, CHAR_FILE, SPM_FILE, WEIGHTS_FILE, TRAINER_FILE, METRICS_FILE, INDEX_FILE, NGRAM_FILE)
SAMPLING_FILES = (CONFIG_FILE, WEIGHTS_FILE, CHAR_FILE, SPM_FILE, NGRAM_FILE)  # what sampling reads (what export copies)
