"""Stage 6 (optional): reinforcement learning on GSM8K. ``python -m scripts.chat_rl``.

Starts from the latest sft checkpoint (``--source`` mid|base for the others) and runs the
simplified "GRPO" of the recipe, which is on-policy REINFORCE with a group-mean baseline:

- each step takes ``--prompts-per-step`` GSM8K training problems (a seeded shuffle, epochs by
  repetition) and the engine samples ``--samples`` replies to each (temperature 1, top-k 50,
  at most ``--max-new-tokens``), calculator calls included;
- a reply's reward is 1 when its final answer matches, else 0; its advantage is the reward
  minus the mean reward of its prompt's group (so a group that is all right or all wrong
  teaches nothing and is skipped);
- loss = -sum(logp(token) * advantage) over the sampled reply tokens, divided by their count:
  prompt tokens and the tool's forced output are not trained;
- the LR (base LRs x ``--lr-scale`` x ``--init-lr-frac``) decays linearly to 0.

Every ``--eval-every`` steps (and before the first and after the last) it reports pass@1 and pass@k
(k = ``--samples``) on the first ``--eval-problems`` GSM8K test problems. Logs, checkpoints, resume
and SIGTERM (checkpoint, exit 143) work as in every trainer (the one loop,
nanochat/training/train_loop.py): sampling seeds derive from the step, so a resumed run samples
what the uninterrupted one would have. Writes rl_checkpoints/<tag>/, logs/rl-<tag>.jsonl (with the
mean reward the report plots) and report/rl.md. Under torchrun each rank takes every world-th
prompt of a step.
"""

from __future__ import annotations

import random
from pathlib import Path

from nanochat.common import (
    CHECKPOINT_KINDS,
    CliParser,
    UsageError,
    base_dir,
    log,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_main,
)
from nanochat.training.train_loop import StepResult, Trainer, add_loop_arguments, run

SOURCES = tuple(reversed(CHECKPOINT_KINDS[:-1]))  # sft, mid, base: RL starts before rl


def build_parser() -> CliParser:
    p = CliParser(prog="python -m scripts.chat_rl", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=SOURCES, default="sft", help="start from (default sft)")
    p.add_argument("--source-tag", help="tag of the source checkpoint (default: most recent)")
    p.add_argument("--tasks", choices=("embedded", "hub"), default="hub", help="GSM8K data")
    p.add_argument("--num-steps", type=positive_int, help="steps (default: one epoch)")
    p.add_argument("--prompts-per-step", type=positive_int, default=16, help="problems per step")
    p.add_argument("--samples", type=positive_int, default=16, help="replies per problem (k)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="reply length cap")
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=50, help="0 = off")
    p.add_argument(
        "--device-batch", type=positive_int, default=8, help="rows per forward/backward pass"
    )
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every base LR")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="LR fraction to start at")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps (0 = end)")
    p.add_argument("--eval-problems", type=positive_int, default=400, help="test problems")
    add_loop_arguments(
        p, save_every=60, tag_help="default: the source checkpoint's tag", compile=False
    )
    return p


# --- the math, kept apart so it can be checked by hand ------------------------------------


def group_advantages(rewards):
    """Rewards shaped [prompts, samples] -> reward minus the mean of its prompt's group."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def policy_loss(token_nll, trained, advantages, token_count: int):
    """REINFORCE: -sum(logp * advantage) over trained tokens / ``token_count``.

    ``token_nll`` [rows, T] is -log p of each target token, ``trained`` [rows, T] is 1 where
    the token was sampled by the model (0 for prompt, padding and tool output) and
    ``advantages`` [rows] is each row's advantage."""
    return (token_nll * trained * advantages[:, None]).sum() / token_count


def pass_at_k(outcomes: list[list[bool]], k: int) -> int:
    """How many problems have a right answer among their first ``k`` samples."""
    return sum(any(samples[:k]) for samples in outcomes)


# --- data: which problem when, and the rows to train on ------------------------------------


class PromptOrder:
    """The training problems in a seeded shuffle per epoch (epochs by repetition). Position
    ``g`` (the g-th prompt of the run) maps to one problem; the position is the only state,
    saved in checkpoints like a data loader's."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.position = size, seed, 0
        self._epoch, self._order = -1, []

    def problem(self, g: int) -> int:
        epoch, within = divmod(g, self.size)
        if epoch != self._epoch:
            self._order = list(range(self.size))
            random.Random(f"{self.seed}/{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order[within]

    @property
    def epoch(self) -> int:
        return self.position // self.size

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def rows_for(prompt: list[int], replies, masks, pad: int):
    """One training row per reply: (inputs, targets) token lists where targets are -1 except
    at sampled reply tokens (so prompt, tool output and padding are never trained)."""
    rows = []
    for reply, mask in zip(replies, masks, strict=True):
        ids = prompt + reply
        targets = [-1] * (len(prompt) - 1) + [
            t if m else -1 for t, m in zip(reply, mask, strict=True)
        ]
        rows.append((ids[:-1] or [pad], targets or [-1]))
    return rows


def pad_rows(rows, pad: int, device):
    import torch

    width = max(len(inputs) for inputs, _ in rows)
    inputs = [r + [pad] * (width - len(r)) for r, _ in rows]
    targets = [t + [-1] * (width - len(t)) for _, t in rows]
    return (
        torch.tensor(inputs, dtype=torch.long, device=device),
        torch.tensor(targets, dtype=torch.long, device=device),
    )


# --- the stage ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nanochat.inference.engine import load_chat_model
    from nanochat.tasks import GSM8K

    base = base_dir()
    if args.source != "base" and not (base / f"{args.source}_checkpoints").is_dir():
        raise UsageError(
            f"no {args.source} checkpoint: run make {'midtrain' if args.source == 'mid' else 'sft'}"
            " first (or --source base|mid)"
        )
    try:
        train_task = GSM8K(source=args.tasks, split="train")
        test_task = GSM8K(source=args.tasks, split="test")
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"{exc} (or use --tasks=embedded)") from None
    model, tokenizer, meta = load_chat_model(
        base, args.source, "cpu", args.source_tag, other_flag="--source", others=SOURCES
    )
    if args.max_new_tokens >= model.config.sequence_len:
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {model.config.sequence_len}"
        )
    from nanochat import runtime

    rt = runtime.start()
    try:
        if args.prompts_per_step % rt.world_size:
            raise UsageError(
                f"--prompts-per-step {args.prompts_per_step} is not a multiple of the "
                f"{rt.world_size} processes"
            )
        return train(args, rt, model, tokenizer, meta, train_task, test_task, base)
    finally:
        runtime.stop(rt)


def train(args, rt, model, tokenizer, meta, train_task, test_task, base: Path) -> int:
    trainer = GSM8KReinforce(args, rt, model, tokenizer, meta, train_task, test_task, base)
    return run(trainer, args, base)


class GSM8KReinforce(Trainer):
    """RL's own parts of the one loop (nanochat/training/train_loop.py): rollouts scored by
    GSM8K's reward, the REINFORCE step, pass@k evals, the prompt order as the data position."""

    name = "rl"
    eta_window = 10

    def __init__(self, args, rt, model, tokenizer, meta, train_task, test_task, base: Path):
        from nanochat.inference.engine import Engine
        from nanochat.model import gpt
        from nanochat.training import checkpoint, optim, recipe, run_state

        self.args, self.rt, self.tokenizer, self.base = args, rt, tokenizer, base
        self.train_task, self.test_task = train_task, test_task
        # a missing wandb is bad input: before any work
        self.wandb_run = run_state.start_wandb(args.run, rt)
        run_state.seed(args.seed)
        self.model = model.to(rt.device)
        self.config = model.config
        self.engine = Engine(model, tokenizer)
        self.order = PromptOrder(len(train_task), args.seed)
        self.num_steps = args.num_steps or max(1, len(train_task) // args.prompts_per_step)
        reply_tokens = args.prompts_per_step * args.samples * args.max_new_tokens
        self.optimizer = optim.build_optimizer(
            gpt.param_groups(model), self.config.n_embd, reply_tokens,
            **recipe.optimizer_defaults(),
        )  # fmt: skip
        run_state.scale_lrs(self.optimizer, args.lr_scale * args.init_lr_frac)
        self.tag = args.tag or meta["tag"]
        self.ckpt_dir = checkpoint.checkpoint_dir(base, "rl", self.tag)
        self.run_config = {
            "init_from": f"{meta['directory']} step {meta['step']}",
            "tasks": args.tasks,
            "num_steps": self.num_steps,
            "prompts_per_step": args.prompts_per_step,
            "samples": args.samples,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "world_size": rt.world_size,
            "lr_scale": args.lr_scale,
            "init_lr_frac": args.init_lr_frac,
            "seed": args.seed,
        }
        self.position = self.order
        self.start_or_resume(args.resume)
        self.sample = dict(temperature=args.temperature, top_k=args.top_k or None)
        if rt.master:
            log(
                f"rl from {self.run_config['init_from']}: {len(train_task):,} GSM8K problems, "
                f"{self.num_steps} steps of {args.prompts_per_step} prompts x {args.samples} "
                f"samples, {rt.world_size} process(es) on {rt.device.type}, "
                f"from step {self.start_step}"
            )
        self.first_results: dict[str, float] = {}

    def on_start(self) -> None:
        """pass@k before the first step of a fresh run (the "before" of the report)."""
        if self.args.eval_every and not self.start_step:
            self.first_results = self.evaluate(self.start_step)
        self.model.train()

    def evaluate(self, step: int) -> dict[str, float]:
        """pass@1 and pass@k on the test problems (the same ones and seeds every time)."""
        import torch

        args, rt, tokenizer, test_task = self.args, self.rt, self.tokenizer, self.test_task
        self.model.eval()
        outcomes = []
        for i in range(rt.rank, min(args.eval_problems, len(test_task)), rt.world_size):
            conversation = test_task[i]
            prompt = tokenizer.render_for_completion(conversation)
            if len(prompt) + 1 >= self.engine.max_context:
                outcomes.append([False] * args.samples)
                continue
            replies, _ = self.engine.generate_batch(
                prompt, args.samples, max_tokens=args.max_new_tokens, seed=10_000 + i,
                **self.sample,
            )  # fmt: skip
            outcomes.append(
                [test_task.evaluate(conversation, tokenizer.decode(r)) for r in replies]
            )
        self.model.train()
        counts = torch.tensor(
            [pass_at_k(outcomes, 1), pass_at_k(outcomes, args.samples), len(outcomes)],
            dtype=torch.float64,
            device=rt.device,
        )
        if rt.distributed:
            import torch.distributed as dist

            dist.all_reduce(counts)
        first, anyk, total = counts.tolist()
        result = {"pass@1": first / max(total, 1), f"pass@{args.samples}": anyk / max(total, 1)}
        if rt.master:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
            log(f"step {step}: GSM8K {shown} over {int(total)} test problems")
        return result

    def rollouts(self, step: int):
        """This rank's rows for the step, each with its advantage; and the rewards."""
        import torch

        args, rt, tokenizer, task = self.args, self.rt, self.tokenizer, self.train_task
        self.model.eval()
        rows, advantages, rewards = [], [], []
        first = step * args.prompts_per_step
        for i in range(rt.rank, args.prompts_per_step, rt.world_size):
            g = first + i
            conversation = task[self.order.problem(g)]
            prompt = tokenizer.render_for_completion(conversation)
            room = self.engine.max_context - len(prompt)
            if room < 2:
                continue  # a prompt longer than the context: nothing to sample
            replies, masks = self.engine.generate_batch(
                prompt,
                args.samples,
                keep_stop=True,
                max_tokens=min(args.max_new_tokens, room),
                seed=args.seed * 1_000_003 + g,
                **self.sample,
            )
            group = torch.tensor(
                [[task.reward(conversation, tokenizer.decode(r)) for r in replies]]
            )
            rewards += group[0].tolist()
            rows += rows_for(prompt, replies, masks, tokenizer.bos_id)
            advantages += group_advantages(group)[0].tolist()
        self.order.position = first + args.prompts_per_step
        self.model.train()
        return rows, advantages, rewards

    def learn(self, rows, advantages) -> float:
        """One optimizer step over this rank's rows; rows with zero advantage are skipped
        (they add nothing) but their tokens still count in the normalisation."""
        import torch

        rt = self.rt
        token_count = max(1, sum(sum(t >= 0 for t in targets) for _, targets in rows))
        useful = [(row, a) for row, a in zip(rows, advantages, strict=True) if a != 0.0]
        total = 0.0
        for start in range(0, len(useful), self.args.device_batch):
            chunk = useful[start : start + self.args.device_batch]
            inputs, targets = pad_rows([row for row, _ in chunk], self.tokenizer.bos_id, rt.device)
            adv = torch.tensor([a for _, a in chunk], dtype=torch.float32, device=rt.device)
            with rt.autocast():
                nll = self.model(inputs, targets, loss_reduction="none")
            loss = policy_loss(nll.float(), (targets >= 0).float(), adv, token_count)
            loss.backward()
            total += loss.item()
        self.optimizer.step()  # also with no useful rows here: ranks step together
        self.model.zero_grad(set_to_none=True)
        return total

    def mean_over_ranks(self, values: list[float]) -> float:
        import torch

        rt = self.rt
        pair = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=rt.device)
        if rt.distributed:
            import torch.distributed as dist

            dist.all_reduce(pair)
        return (pair[0] / pair[1].clamp(min=1)).item()

    def lr_multiplier(self, step: int) -> float:
        from nanochat.training import schedules

        return schedules.lr_multiplier(
            step, self.num_steps, warmup_steps=0, warmdown_frac=1.0, final_frac=0
        )

    def train_step(self, step: int) -> StepResult:
        rows, advantages, rewards = self.rollouts(step)
        # the loss the averaged gradient minimises
        loss = self.mean_over_ranks([self.learn(rows, advantages)])
        reward = self.mean_over_ranks(rewards)
        return StepResult(loss, logged={"reward": reward}, metrics={"reward": reward, "loss": loss})

    def progress(self, result: StepResult, lrm: float, seconds: float) -> str:
        return (
            f"reward {result.logged['reward']:.3f} | loss {result.loss:+.5f} | lrm {lrm:.3f} | "
            f"{seconds:.1f} s | epoch {self.order.epoch}"
        )

    def after_step(self, step: int) -> None:
        if self.args.eval_every and step % self.args.eval_every == 0 and step < self.num_steps:
            self.evaluate(step)  # logged; the report takes the one after the last step

    def finish(self, step: int, record) -> None:
        from nanochat.report import write_section

        args = self.args
        results = self.evaluate(step)
        seconds = record.seconds
        if not self.rt.master:
            return
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
        log(f"done: GSM8K {shown} after {seconds / 60:.1f} min")
        before = ", ".join(f"{k} {v:.4f}" for k, v in self.first_results.items())
        rewards = [r.logged["reward"] for r in record.results]
        write_section(
            self.base,
            "rl",
            "RL (GSM8K)",
            {
                "from": self.run_config["init_from"],
                "tasks": f"{args.tasks}: {len(self.train_task):,} train, "
                f"{min(args.eval_problems, len(self.test_task))} test problems evaluated",
                "steps": f"{self.num_steps} x {args.prompts_per_step} prompts x "
                f"{args.samples} samples",
                "processes": self.rt.world_size,
                "wall time (this run)": f"{seconds / 60:.1f} min",
                "GSM8K before": before or "not measured",
                "GSM8K after": shown,
                "mean reward first / last step": (
                    f"{rewards[0]:.3f} / {rewards[-1]:.3f}" if rewards else "n/a"
                ),
            },
            metrics={**results, **({"mean_reward": rewards[-1]} if rewards else {})},
            wall_seconds=seconds,
        )


if __name__ == "__main__":
    run_main(main)
