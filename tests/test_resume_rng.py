"""A resumed TIPTrainer run generates the same completions as an uninterrupted one.

`Trainer` restores the RNG of a mid-epoch checkpoint only after `get_batch_samples`; TIPTrainer generates inside
`get_batch_samples`, so it must restore the RNG before generating.
"""

from trl_tip import TIPConfig, TIPTrainer
from trl_tip.toy import arithmetic_dataset, make_model, make_tokenizer


def test_resumed_run_generates_and_selects_like_an_uninterrupted_one(tmp_path):
    tokenizer, dataset = make_tokenizer(), arithmetic_dataset(32, seed=0)

    def run(output_dir, resume=None):
        args = TIPConfig(
            output_dir=str(output_dir),
            use_cpu=True,
            bf16=False,
            seed=0,
            max_steps=4,
            per_device_train_batch_size=4,
            max_new_tokens=5,
            logging_steps=1,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            lmbda=1.0,
            learning_rate=2e-2,
            token_selection="random",
        )
        trainer = TIPTrainer(
            model=make_model(tokenizer, 32, 1, seed=2),
            teacher_model=make_model(tokenizer, 32, 1, seed=1),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=resume)
        keys = ("loss", "tip/tokens_eligible", "tip/tokens_kept", "tip/q3/kept_frac")
        return [tuple(log[k] for k in keys) for log in trainer.state.log_history if "loss" in log and log["step"] > 2]

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert len(full) == 2
    assert resumed == full
