"""mergeprobe quickstart: add one callback to a LoRA Trainer, then compare the runs it stored.

Trains two tiny adapters on MiniLM (a sentiment task and the same task with flipped labels),
each for a few steps on CPU, and prints the signals of merging the first with the second.
Run from the repository root: ``python examples/quickstart.py`` (needs ``mergeprobe[demo]``).
"""

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

from mergeprobe import MergeProbeCallback, SignatureStore, pairwise_signals
from mergeprobe.demo import TextDataset, flip_labels, load_tokenizer, model_path, sentiment_examples

tokenizer = load_tokenizer()
examples = sentiment_examples(200)  # tiny generated data: ("the movie was great", 1), ...

for task, data in [("sentiment", examples), ("sentiment_flipped", flip_labels(examples))]:
    set_seed(0)  # both runs start from the same head and LoRA init
    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    args = TrainingArguments(
        output_dir=f"runs/{task}",  # the store entry is named after this folder
        max_steps=20,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(
        model=get_peft_model(base, lora),
        args=args,
        train_dataset=TextDataset(data, tokenizer),
        processing_class=tokenizer,
        callbacks=[MergeProbeCallback("mergeprobe-store")],
    )
    trainer.train()

store = SignatureStore("mergeprobe-store")
print("store entries:", store.names())
if len(store.names()) >= 2:
    a, b = (store.load(name) for name in store.names()[:2])
    for key, value in pairwise_signals(a, b).items():
        print(f"{a.name} | {b.name}  {key:<26} {value:.3f}")
