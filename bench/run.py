"""`make bench`: every engine on the same machine in one run -> bench/results/results.json + tables.

    python -m bench.run [--quick] [--only SECTION[,SECTION]] [--out FILE] [--threads 2] [--ours-compile]

Sections (in run order): prepare, bandwidth, kernels, llamacpp, prefill, hf, hf_serve, ours, ours_1p5b, overload,
itl_long_prefill, guidellm, prefix_cache, perplexity, operator, distill. `--only` runs some of them and merges
into the existing results file, so a partial rerun keeps the other numbers. Each engine runs in its own
subprocess (servers too), so peak RSS is its own and a crash is recorded as an error in the JSON without
stopping the rest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.bandwidth import ModelShape, weight_bytes_per_token
from bench.guidellm_run import run_guidellm_sweep
from bench.itl_bench import run_itl_long_prefill
from bench.loadgen import run_http_benchmark, run_overload
from bench.procs import REPO_ROOT, ServerUnderTest, free_port, run_step

SECTIONS = ["prepare", "bandwidth", "kernels", "llamacpp", "prefill", "hf", "hf_serve", "ours", "ours_1p5b", "overload",
            "itl_long_prefill", "guidellm", "prefix_cache", "perplexity", "operator", "distill"]
MODELS = REPO_ROOT / "models"
GGUF_Q4 = MODELS / "qwen2.5-0.5b-q4_k_m.gguf"
GGUF_Q8 = MODELS / "qwen2.5-0.5b-q8_0.gguf"
ST_0P5B = MODELS / "qwen2.5-0.5b-st"
R1_1P5B = MODELS / "r1-distill-qwen-1.5b-shape-random"
# The real R1-Distill tokenizer, carried in the repository (third_party/reference/README.md says whence).
R1_TOKENIZER_DIR = REPO_ROOT / "third_party" / "reference" / "deepseek-r1-distill-qwen-tokenizer"
SMALL, BIG = "qwen2.5-0.5b", "r1-1.5b-shape"

# A raw completion prompt (no chat template, so every engine sees the same tokens) that a code model
# continues for hundreds of tokens; greedy decoding everywhere.
PROMPT = (
    "# Python: a small library for parsing and evaluating arithmetic expressions.\n"
    "# It has a tokenizer, a recursive-descent parser that builds an AST, an evaluator,\n"
    "# and unit tests for every feature.\n\nimport re\nfrom dataclasses import dataclass\n\n"
)


@dataclass
class Settings:
    threads: int = 2
    single_tokens: int = 128  # new tokens for single-stream decode rate
    repeats: int = 2  # single-stream repeats (median reported), after one warm-up
    conc_tokens: int = 128  # new tokens per request in the concurrency sweep (as single-stream: decode-dominated)
    levels: tuple[int, ...] = (1, 4, 8, 16)
    big_tokens: int = 64  # single-stream tokens on the 1.5B-shaped model
    overload_streams: int = 16
    overload_max_queue: int = 8
    overload_max_batch: int = 4  # 4 running + 8 queued admits 12 of 16: the rest must get 429
    overload_tokens: int = 16
    ppl_max_tokens: int | None = None  # the whole fixed text
    ppl_window: int = 512
    bandwidth_mib: int = 512
    max_model_len: int = 4096  # our server's context (KV slot length) on the 0.5B
    step_timeout_s: float = 900.0
    ours_compile: bool = False  # DISTILLERY_COMPILE=1 for our server (torch.compile warm-up at start)
    ours_modes: tuple[str, ...] = ("bf16", "int8", "int4")  # which of our modes the ours* sections run
    guidellm_seconds: float = 30.0  # guidellm's run against our server (int8 0.5B), concurrent streams
    # one guidellm run per number of concurrent users, 256-token prompts / 128 output tokens (issue 15's load):
    # total output tokens/s of 8 users over 1 (guidellm_run.summarize: every request's tokens in the window, after
    # guidellm_run.WARMUP); at least 60 s each, so that 8 users finish several requests each
    guidellm_levels: tuple[int, ...] = (1, 8)
    guidellm_prompt_tokens: int = 256
    guidellm_output_tokens: int = 128
    guidellm_min_seconds: float = 60.0
    # the levels run this many times, in turn (guidellm_run.run_guidellm_sweep: one 60-s run moves by ~8% on the
    # 2-vCPU VM); the ratio is that of the levels' means, each round's kept beside it
    guidellm_rounds: int = 2
    # itl_long_prefill: decoding streams while a ~2,000-token prompt is prefilled beside them
    itl_modes: tuple[str, ...] = ("int4",)
    itl_streams: int = 4
    itl_long_tokens: int = 2000
    itl_settle_s: float = 5.0  # the streams decode this long before the long prompt comes
    prefix_modes: tuple[str, ...] = ("int8", "int4")  # prefix_cache: our quantized modes run (cache on and off)
    prefix_tokens: int = 32  # prefix_cache: new tokens per request (outputs compared with the cache on and off)
    # prefill: time to first token on a ~1,000-token prompt, engines interleaved round by round
    prefill_tokens: int = 1000
    prefill_rounds: int = 2
    prefill_repeats: int = 3

    @classmethod
    def quick(cls) -> Settings:
        return cls(single_tokens=16, repeats=1, conc_tokens=8, levels=(1, 4), big_tokens=8, overload_tokens=4,
                   ppl_max_tokens=256, ppl_window=128, bandwidth_mib=128, guidellm_seconds=10.0, guidellm_rounds=1,
                   prefix_modes=("int8",), prefix_tokens=8, prefill_rounds=1, prefill_repeats=1)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, settings: Settings, results: dict[str, Any]) -> None:
        self.s = settings
        self.results = results
        self.runs: dict[str, dict[str, Any]] = results.setdefault("runs", {})

    # ---- helpers -------------------------------------------------------------------------------
    def step(self, name: str, step: str, args: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        _log(f"{name} ...")
        res = run_step(name.replace("/", "_"), step, args, threads=self.s.threads,
                       timeout_s=timeout_s or self.s.step_timeout_s)
        _log(f"{name}: {'ok' if res.ok else 'FAILED: ' + str(res.error)[:300]} ({res.wall_s:.0f}s)")
        return res.as_dict()

    def shape(self, model: str) -> ModelShape | None:
        cfg = (ST_0P5B if model == SMALL else R1_1P5B) / "config.json"
        return ModelShape.from_hf_config(json.loads(cfg.read_text())) if cfg.exists() else None

    def bytes_for(self, model: str, mode: str, *, ours: bool = False) -> float | None:
        """Arithmetic weight bytes per token. Our runtime keeps lm_head in int8 whenever it quantizes
        the decoder (model_runtime.loader.lm_head_method, auto); the peers keep it in the float width."""
        shape = self.shape(model)
        if shape is None:
            return None
        lm_head = "int8" if ours and mode in ("int8", "int4") else None
        return weight_bytes_per_token(shape, mode, lm_head_mode=lm_head)

    # ---- sections ------------------------------------------------------------------------------
    def prepare(self) -> None:
        if not GGUF_Q4.exists():
            import subprocess

            _log("fetching the real 0.5B GGUF (scripts/fetch_model.py) ...")
            subprocess.run([sys.executable, "scripts/fetch_model.py", "--dest", str(GGUF_Q4)], cwd=REPO_ROOT,
                           check=False)
        prep = self.results.setdefault("prepare", {})
        prep["safetensors_0p5b"] = self.step("prepare/st", "prepare_st", {"gguf": str(GGUF_Q4), "dest": str(ST_0P5B)})
        prep["r1_1p5b_shape"] = self.step("prepare/r1", "prepare_r1",
                                          {"dest": str(R1_1P5B), "tokenizer_dir": str(R1_TOKENIZER_DIR)})
        prep["q8_0"] = self.step("prepare/q8_0", "prepare_q8", {"src": str(GGUF_Q4), "dest": str(GGUF_Q8)})

    def bandwidth(self) -> None:
        bw = self.step("bandwidth", "bandwidth", {"array_mib": self.s.bandwidth_mib})
        per_token: dict[str, Any] = {}
        for model in (SMALL, BIG):
            shape = self.shape(model)
            if shape:
                per_token[model] = {m: weight_bytes_per_token(shape, m) for m in ("fp32", "bf16", "int8", "int4")}
                for m in ("int8", "int4"):  # ours: lm_head int8 as well
                    per_token[model][f"ours-{m}"] = weight_bytes_per_token(shape, m, lm_head_mode="int8")
        for name, path in (("Q4_K_M", GGUF_Q4), ("Q8_0", GGUF_Q8)):
            if path.exists():
                g = self.step(f"gguf-bytes/{name}", "gguf_bytes", {"path": str(path)})
                per_token.setdefault(SMALL, {})[f"gguf-{name}"] = g.get("bytes_per_token")
        self.results["bandwidth"] = {"copy": bw, "weight_bytes_per_token": per_token,
                                     "note": "bytes = decoder Linears at the mode's stored width (int8: +1 scale "
                                             "per output channel, int4: +scale+zero per group of 128) + norms/"
                                             "biases at bf16 + lm_head at bf16 (ours-*: lm_head int8, as our "
                                             "runtime stores it); embedding excluded"}

    def kernels(self) -> None:
        """Our AVX2 kernels vs PyTorch's packed ones per layer shape, and the bare decode step per mode."""
        self.results["kernels"] = self.step("kernels", "kernels", {"repeats": 20})
        self.results["decode_steps"] = self.step("decode-steps", "decode_steps",
                                                 {"model_dir": str(ST_0P5B), "modes": ["bf16", "int8", "int4"]})

    def llamacpp(self) -> None:
        for mode, path in (("Q4_K_M", GGUF_Q4), ("Q8_0", GGUF_Q8)):
            key = f"{SMALL}/llama.cpp/{mode}"
            base = {"model": SMALL, "engine": "llama.cpp", "mode": mode, "interface": "in-process"}
            if not path.exists():
                self.runs[key] = {**base, "error": f"{path.name} missing (see prepare.q8_0)"}
                continue
            res = self.step(key, "llamacpp", {"gguf": str(path), "prompt": PROMPT,
                                              "new_tokens": self.s.single_tokens, "repeats": self.s.repeats})
            per_token = ((self.results.get("bandwidth") or {}).get("weight_bytes_per_token") or {}).get(
                SMALL, {}).get(f"gguf-{mode}")
            self.runs[key] = {**base, **res, "bytes_per_token": per_token}

    def hf(self) -> None:
        plan = [(SMALL, ST_0P5B, "fp32", self.s.single_tokens), (SMALL, ST_0P5B, "bf16", self.s.single_tokens),
                (BIG, R1_1P5B, "bf16", self.s.big_tokens)]
        for model, path, dtype, tokens in plan:
            key = f"{model}/transformers-generate/{dtype}"
            res = self.step(key, "hf_generate", {"model_dir": str(path), "dtype": dtype, "prompt": PROMPT,
                                                 "new_tokens": tokens,
                                                 # fp32 and the 1.5B are slow: one timed run each
                                                 "repeats": self.s.repeats if (model, dtype) == (SMALL, "bf16") else 1})
            self.runs[key] = {"model": model, "engine": "transformers-generate", "mode": dtype,
                              "interface": "in-process", **res, "bytes_per_token": self.bytes_for(model, dtype)}

    def _http_run(self, key: str, base: dict[str, Any], cmd: list[str], ready_path: str, model_name: str,
                  port: int, *, levels: tuple[int, ...], single_tokens: int, repeats: int) -> dict[str, Any]:
        out = dict(base)
        _log(f"{key} ...")
        t0 = time.monotonic()
        env = {"DISTILLERY_COMPILE": "1"} if base.get("engine") == "ours" and self.s.ours_compile else {}
        out["env"] = env
        server = ServerUnderTest(key.replace("/", "_"), cmd, f"http://127.0.0.1:{port}{ready_path}",
                                 threads=self.s.threads, env=env)
        try:
            with server:
                out["load_s"] = server.load_s
                out["rss_after_load_mb"] = server.rss_after_load_mb
                out["rss_file_after_load_mb"] = server.rss_file_after_load_mb
                out.update(run_http_benchmark(f"http://127.0.0.1:{port}", model_name, PROMPT,
                                              single_tokens=single_tokens, repeats=repeats,
                                              conc_tokens=self.s.conc_tokens, levels=list(levels)))
                out["server_alive_after"] = server.alive()
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            out["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        out["peak_rss_mb"] = server.peak_rss_mb
        out["log"] = str(server.log_path)
        _log(f"{key}: {'FAILED: ' + out['error'][:300] if 'error' in out else 'ok'} ({time.monotonic() - t0:.0f}s)")
        return out

    def hf_serve(self) -> None:
        for cb in (False, True):
            mode = "bf16+cb" if cb else "bf16"
            key = f"{SMALL}/transformers-serve/{mode}"
            port = free_port()
            cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(ST_0P5B), "--host", "127.0.0.1",
                   "--port", str(port), "--dtype", "bfloat16", "--device", "cpu", "--log-level", "warning",
                   "--continuous-batching" if cb else "--no-continuous-batching"]
            base = {"model": SMALL, "engine": "transformers-serve", "mode": mode, "interface": "http",
                    "bytes_per_token": self.bytes_for(SMALL, "bf16")}
            self.runs[key] = self._http_run(key, base, cmd, "/health", str(ST_0P5B), port, levels=self.s.levels,
                                            single_tokens=self.s.single_tokens, repeats=self.s.repeats)

    def _ours_cmd(self, model_dir: Path, name: str, port: int, quant: str, *, max_batch: int,
                  max_queue: int, max_model_len: int | None = None) -> list[str]:
        from distillery_contract import flags as c

        extra = [c.FLAG_MAX_MODEL_LEN, str(max_model_len)] if max_model_len else []
        return [sys.executable, "-m", c.RUNTIME_MODULE, c.FLAG_MODEL_NAME, name, c.FLAG_MODEL_DIR, str(model_dir),
                c.FLAG_HTTP_PORT, str(port), "--http_host", "127.0.0.1", "--grpc_port", str(free_port()),
                "--enable_grpc", "false", "--log_level", "WARNING",
                c.FLAG_QUANTIZATION, quant, c.FLAG_MAX_BATCH_SIZE, str(max_batch), c.FLAG_MAX_QUEUE, str(max_queue),
                *extra]

    def _ours(self, model: str, model_dir: Path, *, levels: tuple[int, ...], tokens: int, repeats: int,
              max_model_len: int | None = None) -> None:
        from distillery_contract import flags as c

        for mode, quant in (("bf16", "none"), ("int8", "int8"), ("int4", "int4")):
            if mode not in self.s.ours_modes:
                continue
            key = f"{model}/ours/{mode}"
            port = free_port()
            max_batch = max(levels) if levels else 1
            cmd = self._ours_cmd(model_dir, model, port, quant, max_batch=max_batch, max_queue=4 * max_batch,
                                 max_model_len=max_model_len)
            base = {"model": model, "engine": "ours", "mode": mode, "interface": "http",
                    "bytes_per_token": self.bytes_for(model, mode, ours=True), "max_batch_size": max_batch,
                    "max_model_len": max_model_len}
            self.runs[key] = self._http_run(key, base, cmd, c.HEALTH_READY_PATH_TEMPLATE.format(model_name=model),
                                            model, port, levels=levels, single_tokens=tokens, repeats=repeats)

    def ours(self) -> None:
        # 4096 positions per KV slot (the engine's default context) rather than the model's 32768: the KV
        # cache is preallocated per slot, and 16 slots x 32k would dominate the RSS figure
        self._ours(SMALL, ST_0P5B, levels=self.s.levels, tokens=self.s.single_tokens, repeats=self.s.repeats,
                   max_model_len=self.s.max_model_len)

    def ours_1p5b(self) -> None:
        # single stream only, one KV-cache slot of 1024 positions: the RSS comparison is about the weights
        self._ours(BIG, R1_1P5B, levels=(), tokens=self.s.big_tokens, repeats=1, max_model_len=1024)
        bf16 = (self.runs.get(f"{BIG}/ours/bf16") or {}).get("peak_rss_mb")
        int4 = (self.runs.get(f"{BIG}/ours/int4") or {}).get("peak_rss_mb")
        int8 = (self.runs.get(f"{BIG}/ours/int8") or {}).get("peak_rss_mb")
        ready = {m: (self.runs.get(f"{BIG}/ours/{m}") or {}).get("rss_after_load_mb") for m in ("bf16", "int4")}
        self.results["memory_1p5b"] = {
            "bf16_peak_rss_mb": bf16, "int8_peak_rss_mb": int8, "int4_peak_rss_mb": int4,
            "int4_over_bf16": round(int4 / bf16, 3) if bf16 and int4 else None,
            "int8_over_bf16": round(int8 / bf16, 3) if bf16 and int8 else None,
            "bf16_rss_when_ready_mb": ready["bf16"], "int4_rss_when_ready_mb": ready["int4"],
            "int4_over_bf16_when_ready": round(ready["int4"] / ready["bf16"], 3)
            if ready["bf16"] and ready["int4"] else None,
            "note": "peak RSS of the whole server process tree (our runtime over HTTP) over load + generation; "
                    "'when ready' = RSS at the moment the model turned ready",
        }

    def overload(self) -> None:

        port = free_port()
        key = f"{SMALL}/ours/int8-overload"
        cmd = self._ours_cmd(ST_0P5B, SMALL, port, "int8", max_batch=self.s.overload_max_batch,
                             max_queue=self.s.overload_max_queue, max_model_len=self.s.max_model_len)
        out: dict[str, Any] = {"requested_streams": self.s.overload_streams, "max_queue": self.s.overload_max_queue,
                               "max_batch_size": self.s.overload_max_batch, "max_tokens": self.s.overload_tokens}
        self.results["overload"] = self._with_small_server(key, cmd, port, out, lambda base: run_overload(
            base, SMALL, PROMPT, streams=self.s.overload_streams, max_tokens=self.s.overload_tokens))

    def _with_small_server(self, key: str, cmd: list[str], port: int, out: dict[str, Any],
                           client: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """Start our server on the small model, run `client(base_url)` against it, record its figures, whether
        the server survived, any error and the server's log into `out`."""
        from distillery_contract import flags as c

        _log(f"{key} ...")
        server = ServerUnderTest(key.replace("/", "_"), cmd,
                                 f"http://127.0.0.1:{port}{c.HEALTH_READY_PATH_TEMPLATE.format(model_name=SMALL)}",
                                 threads=self.s.threads)
        try:
            with server:
                out.update(client(f"http://127.0.0.1:{port}"))
                out["server_alive_after"] = server.alive()
        except Exception as exc:  # noqa: BLE001
            out["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        out["log"] = str(server.log_path)
        _log(f"{key}: {out.get('error') or 'ok'}")
        return out

    def guidellm(self) -> None:
        """guidellm (a load client that probes GET /health) against our server, no route configuration: 1 and 8
        concurrent users with 256-token prompts and 128 output tokens, the server's default token budget."""

        port = free_port()
        key = f"{SMALL}/ours/int8-guidellm"
        users = max(self.s.guidellm_levels)
        cmd = self._ours_cmd(ST_0P5B, SMALL, port, "int8", max_batch=users, max_queue=4 * users,
                             max_model_len=self.s.max_model_len)
        out: dict[str, Any] = {"model": SMALL, "mode": "int8", "max_batch_size": users}
        self.results["guidellm"] = self._with_small_server(key, cmd, port, out, lambda base: run_guidellm_sweep(
            base, ST_0P5B, REPO_ROOT / ".cache" / "bench" / "guidellm", levels=self.s.guidellm_levels,
            rounds=self.s.guidellm_rounds, seconds=max(self.s.guidellm_seconds, self.s.guidellm_min_seconds),
            prompt_tokens=self.s.guidellm_prompt_tokens, output_tokens=self.s.guidellm_output_tokens))

    def itl_long_prefill(self) -> None:
        """Streams decoding on our server (real 0.5B) while a ~2,000-token prompt is submitted beside them: the
        streams' inter-token latency median and p99 around the prefill, and the long prompt's TTFT
        (bench/itl_bench.py), at the server's default token budget per step (max_num_batched_tokens)."""
        from transformers import AutoTokenizer

        from bench.ppl_text import PPL_TEXT
        from model_runtime.engine import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_PREFILL_CHUNK

        ids: list[int] = AutoTokenizer.from_pretrained(str(ST_0P5B))(PPL_TEXT)["input_ids"]
        long_ids = (ids * (1 + self.s.itl_long_tokens // max(1, len(ids))))[: self.s.itl_long_tokens]
        section: dict[str, Any] = {}
        for mode in self.s.itl_modes:
            port = free_port()
            cmd = self._ours_cmd(ST_0P5B, SMALL, port, mode, max_batch=self.s.itl_streams + 1,
                                 max_queue=4, max_model_len=self.s.max_model_len)
            out: dict[str, Any] = {"model": SMALL, "mode": mode, "max_num_batched_tokens": DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                   "prefill_chunk": DEFAULT_PREFILL_CHUNK}
            section[mode] = self._with_small_server(
                f"{SMALL}/ours/{mode}-itl-long-prefill", cmd, port, out, lambda base: run_itl_long_prefill(
                    base, SMALL, decode_prompt=PROMPT, long_prompt_ids=long_ids, streams=self.s.itl_streams,
                    settle_s=self.s.itl_settle_s))
        self.results["itl_long_prefill"] = section

    def prefix_cache(self) -> None:
        """Two requests sharing a ~1,000-token prefix, one after the other, on a server with prefix caching
        and on one without (bench/prefix_bench.py): the second's TTFT over the first's, identical texts."""
        from bench.prefix_bench import run_prefix_requests, summarize

        section: dict[str, Any] = {}
        for mode in self.s.prefix_modes:
            runs: dict[str, dict[str, Any]] = {}
            for cache in ("on", "off"):
                port = free_port()
                cmd = self._ours_cmd(ST_0P5B, SMALL, port, mode, max_batch=1, max_queue=4,
                                     max_model_len=self.s.max_model_len) + [f"--enable_prefix_caching={cache == 'on'}"]
                runs[cache] = self._with_small_server(
                    f"{SMALL}/ours/{mode}-prefix-cache-{cache}", cmd, port, {},
                    lambda base: run_prefix_requests(base, SMALL, max_tokens=self.s.prefix_tokens))
            section[mode] = {**summarize(runs["on"], runs["off"]), "runs": runs}
        self.results["prefix_cache"] = section

    def prefill(self) -> None:
        """Time to first token on a ~1,000-token prompt (bench/prefill.py), in-process: ours int8 / int4 with
        the KernelPlan's prefill kernel for this CPU, ours int8 with every prompt row on the decode kernels
        (the path of before), llama.cpp Q4_K_M; the engines interleaved round by round. Plus the prefill
        kernels against our decode kernels per layer shape of the 0.5B at 256 rows."""
        common = {"prompt_tokens": self.s.prefill_tokens, "repeats": self.s.prefill_repeats}
        variants: list[tuple[str, str, dict[str, Any]]] = []
        if GGUF_Q4.exists():
            variants.append(("llama.cpp/Q4_K_M", "prefill_llamacpp", {"gguf": str(GGUF_Q4)}))
        for mode in ("int8", "int4"):
            variants.append((f"ours/{mode}", "prefill_ours", {"model_dir": str(ST_0P5B), "quantization": mode}))
        variants.append(("ours/int8-decode-kernels", "prefill_ours",
                         {"model_dir": str(ST_0P5B), "quantization": "int8", "prefill_kernel": "none"}))
        # int4 with every prompt row on the decode kernels: the plan's choice (the matrix engine, weights
        # requantized per call; on AVX2 alone pf_w4_gemm_avx2 on their own codes) is checked against it here
        variants.append(("ours/int4-decode-kernels", "prefill_ours",
                         {"model_dir": str(ST_0P5B), "quantization": "int4", "prefill_kernel": "none"}))
        rounds: dict[str, list[dict[str, Any]]] = {}
        for r in range(self.s.prefill_rounds):
            for key, step, args in variants:
                rounds.setdefault(key, []).append(self.step(f"prefill/{key}#{r}", step, {**args, **common}))
        engines = {key: report.merge_ttft_rounds(res) for key, res in rounds.items()}
        base = (engines.get("llama.cpp/Q4_K_M") or {}).get("ttft_s")
        for key, res in engines.items():
            if base and res.get("ttft_s") and key.startswith("ours/"):
                res["ttft_over_llamacpp"] = round(res["ttft_s"] / base, 3)
        self.results["prefill"] = {
            "prompt_tokens": self.s.prefill_tokens, "cpu_isa": _meta(self.s)["cpu_isa"], "engines": engines,
            "kernels": self.step("prefill/kernels", "prefill_kernels", {"m": 256}),
            "note": "TTFT = submit to first greedy token, in-process (no HTTP), prompt = the first tokens of "
                    "bench/ppl_text.py, first token changed per run (no prefix reuse)"}

    def perplexity(self) -> None:
        ppl: dict[str, Any] = {}
        for mode, quant in (("bf16", "none"), ("int8", "int8"), ("int4", "int4")):
            ppl[mode] = self.step(f"perplexity/{mode}", "perplexity",
                                  {"model_dir": str(ST_0P5B), "quantization": quant,
                                   "max_tokens": self.s.ppl_max_tokens, "window": self.s.ppl_window})
        base = (ppl.get("bf16") or {}).get("perplexity")
        for mode in ("int8", "int4"):
            value = (ppl.get(mode) or {}).get("perplexity")
            if base and value:
                ppl[mode]["rise_vs_bf16"] = round((value - base) / base, 5)
        ppl["text"] = "bench/ppl_text.py (original CC0 prose + code, fixed)"
        self.results["perplexity"] = ppl

    def operator(self) -> None:
        if not (REPO_ROOT / "bench" / "operator_bench.py").exists():
            self.results["operator"] = {"error": "bench/operator_bench.py not present"}
            return
        self.results["operator"] = self.step("operator", "operator_bench", {})

    def distill(self) -> None:
        # the demo's pair: the real 0.5B teacher and its first 4 layers (bench/distill.py)
        self.results["distill"] = self.step("distill", "distill", {
            "teacher": str(ST_0P5B), "student": str(MODELS / "qwen2.5-0.5b-first4"), "layers": 4,
            "max_steps": 4 if self.s.single_tokens < 32 else None})  # --quick: 4 steps

    # ---- derived -------------------------------------------------------------------------------
    def finish(self) -> None:
        # the perplexity step counted the bytes the loaded model really holds: prefer them to arithmetic
        ppl = self.results.get("perplexity") or {}
        for mode in ("bf16", "int8", "int4"):
            run = self.runs.get(f"{SMALL}/ours/{mode}")
            measured = (ppl.get(mode) or {}).get("decode_bytes_per_token")
            if run is not None and measured:
                run["bytes_per_token_arithmetic"] = self.bytes_for(SMALL, mode, ours=True)
                run["bytes_per_token"] = measured
                run["bytes_per_token_source"] = "counted on the loaded model (perplexity step)"
        bw = ((self.results.get("bandwidth") or {}).get("copy") or {}).get("best_gb_s")
        report.add_bounds(self.runs, bw)
        self.results["targets"] = report.evaluate_targets(self.results)


def _meta(settings: Settings) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "llama-cpp-python", "torchao", "kserve", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import os

    # the instruction sets that decide which kernels every engine here can use
    isa = sorted(flags & {"avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"})
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host_cpu": cpu, "cpu_isa": isa,
            "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "settings": asdict(settings), "prompt": PROMPT, "command": " ".join(["python -m bench.run", *sys.argv[1:]])}


def parse_sections(only: list[str] | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    wanted: list[str] = []
    for item in only:
        for name in item.split(","):
            name = name.strip()
            if name == "peers":
                wanted += ["llamacpp", "hf", "hf_serve"]
            elif name in SECTIONS:
                wanted.append(name)
            elif name:
                raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)} or 'peers'")
    return [s for s in SECTIONS if s in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny token counts, for development")
    parser.add_argument("--only", action="append", help="run only these sections (comma list; 'peers' = "
                        "llamacpp,hf,hf_serve); results merge into --out")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "results.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ours-compile", action="store_true",
                        help="run our server with DISTILLERY_COMPILE=1 (torch.compile'd decode step; slower start)")
    parser.add_argument("--ours-modes", default="bf16,int8,int4",
                        help="our modes to run in the ours/ours_1p5b sections (comma list; others keep their results)")
    # a slow CPU needs longer: on a 2-vCPU Zen 1, 8 users of 285-token prompts finished no request in 60 s
    parser.add_argument("--guidellm-seconds", type=float, default=None,
                        help="seconds of each guidellm level (default: the larger of 30 and 60)")
    parser.add_argument("--guidellm-rounds", type=int, default=None,
                        help="times each guidellm level runs, the levels in turn (default 2; --quick: 1)")
    ns = parser.parse_args(argv)
    settings = Settings.quick() if ns.quick else Settings()
    settings.ours_modes = tuple(m.strip() for m in ns.ours_modes.split(",") if m.strip())
    if not set(settings.ours_modes) <= {"bf16", "int8", "int4"}:
        raise SystemExit(f"--ours-modes: choose from bf16, int8, int4 (got {ns.ours_modes!r})")
    settings.threads = ns.threads
    settings.ours_compile = ns.ours_compile
    if ns.guidellm_seconds is not None:
        if ns.guidellm_seconds <= 0:
            raise SystemExit(f"--guidellm-seconds: must be > 0 (got {ns.guidellm_seconds})")
        settings.guidellm_seconds = settings.guidellm_min_seconds = ns.guidellm_seconds
    if ns.guidellm_rounds is not None:
        if ns.guidellm_rounds < 1:
            raise SystemExit(f"--guidellm-rounds: must be >= 1 (got {ns.guidellm_rounds})")
        settings.guidellm_rounds = ns.guidellm_rounds
    sections = parse_sections(ns.only)
    results: dict[str, Any] = {}
    if ns.only and ns.out.exists():
        results = json.loads(ns.out.read_text())
    results["meta"] = _meta(settings)
    bench = Bench(settings, results)
    if "prepare" not in sections and not (ST_0P5B / ".complete").exists():
        sections.insert(0, "prepare")  # every other section needs the models
    t0 = time.monotonic()
    handlers: dict[str, Callable[[], None]] = {name: getattr(bench, name) for name in SECTIONS}
    for name in sections:
        try:
            handlers[name]()
        except Exception as exc:  # noqa: BLE001 - a harness bug in one section must not lose the rest
            traceback.print_exc()
            results.setdefault("section_errors", {})[name] = f"{type(exc).__name__}: {exc}"
        bench.finish()
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(json.dumps(results, indent=2))  # after every section: a crash loses nothing
    results["meta"]["total_s"] = round(time.monotonic() - t0, 1)
    ns.out.write_text(json.dumps(results, indent=2))
    print_report(results)
    print(f"\nresults: {ns.out}")
    return 0


def print_report(results: dict[str, Any]) -> None:
    bw = (results.get("bandwidth") or {}).get("copy") or {}
    print("\n## Decode speed (greedy; single stream: new tokens after the first / time; aggregate: all "
          "tokens / wall time of the batch)\n")
    print(report.markdown_table(results.get("runs", {})))
    kern = results.get("kernels") or {}
    if kern.get("rows"):
        print("\n## Linear kernels (ms per call, median; PyTorch packed vs ours)\n")
        print(report.kernel_table(kern))
    steps = results.get("decode_steps") or {}
    if steps.get("rows"):
        print("\n## Decode step of the model itself (real 0.5B, no engine/HTTP)\n")
        print(report.decode_steps_table(steps, bw.get("best_gb_s")))
    if bw:
        print(f"\nCopy bandwidth (read+write): numpy {bw.get('numpy_gb_s')} GB/s, torch {bw.get('torch_gb_s')} GB/s; "
              f"bound = {bw.get('best_gb_s')} GB/s / weight bytes read per token. Read-only stream (torch sum): "
              f"{bw.get('torch_read_gb_s', '-')} GB/s; on 2 MiB pages "
              f"{bw.get('torch_read_huge_gb_s') or 'not measured (the kernel gave too few)'} GB/s "
              f"({bw.get('huge_page_kib', '-')} KiB of huge pages).")
    if results.get("perplexity"):
        print("\n## Perplexity on bench/ppl_text.py (real 0.5B, our loader)\n")
        print(report.perplexity_table(results["perplexity"]))
    over = results.get("overload")
    if over:
        print(f"\nOverload ({over.get('requested_streams')} streams, max_batch_size {over.get('max_batch_size')}, max_queue "
              f"{over.get('max_queue')}): ok {over.get('ok')}, 429 {over.get('http_429')}, errors {over.get('errors')}, "
              f"healthy after {over.get('healthy_after')} {over.get('error') or ''}")
    gl = results.get("guidellm")
    if gl:
        levels = gl.get("levels") or [0]
        key = f"output_tokens_per_s_{max(levels)}u_over_{min(levels)}u"
        print(f"guidellm ({gl.get('mode')}, users {levels}, {gl.get('seconds')} s each, {gl.get('rounds', 1)} round(s), "
              f"{gl.get('prompt_tokens')}+{gl.get('output_tokens')} tokens): output tok/s "
              f"{gl.get('output_tokens_per_s')} (most/fewest users {gl.get(key)}, per round {gl.get(key + '_per_round')}), "
              f"TTFT median ms {gl.get('ttft_ms_median')}, "
              f"ITL median ms {gl.get('itl_ms_median')} {gl.get('error') or ''}")
    for mode, il in (results.get("itl_long_prefill") or {}).items():
        during = il.get("during_prefill") or {}
        print(f"ITL with a {il.get('long_prompt_tokens')}-token prompt prefilling ({mode}, {il.get('streams')} streams, "
              f"budget {il.get('max_num_batched_tokens')} tokens/step): median {il.get('itl_ms_median')} ms, p99 "
              f"{il.get('itl_ms_p99')} ms (p99/median {il.get('itl_p99_over_median')}; during the prefill median "
              f"{during.get('median_ms')} max {during.get('max_ms')} ms), long prompt TTFT {il.get('long_ttft_s')} s "
              f"{il.get('error') or ''}")
    if results.get("prefill"):
        pf = results["prefill"]
        print(f"\n## Time to first token, ~{pf.get('prompt_tokens')}-token prompt (in-process; CPU "
              f"{', '.join(pf.get('cpu_isa') or [])})\n")
        print(report.prefill_table(pf))
    for mode, pc in (results.get("prefix_cache") or {}).items():
        print(f"prefix cache ({mode}, prompts of {pc.get('prompt_tokens')} tokens sharing ~1,000): TTFT first "
              f"{pc.get('ttft_first_s')} s, second {pc.get('ttft_second_s')} s (second/first "
              f"{pc.get('second_over_first')}; cache off {pc.get('cache_off_second_over_first')}), identical "
              f"outputs on/off {pc.get('identical_outputs')}")
    mem = results.get("memory_1p5b")
    if mem:
        print(f"1.5B shape peak RSS: bf16 {mem.get('bf16_peak_rss_mb')} MiB, int8 {mem.get('int8_peak_rss_mb')} MiB, "
              f"int4 {mem.get('int4_peak_rss_mb')} MiB (int4/bf16 {mem.get('int4_over_bf16')})")
    if results.get("operator"):
        print(f"operator bench: {json.dumps(results['operator'])[:400]}")
    distill = results.get("distill") or {}
    if distill.get("train_tokens_per_s"):
        print(f"\n## Distillation on the CPU ({distill['job']}: 0.5B teacher -> its first "
              f"{distill['student_layers']} layers, {distill['steps']} steps)\n")
        print(f"training {distill['train_tokens_per_s']} tokens/s; KL(teacher || student) {distill['kl_before']} -> "
              f"{distill['kl_after']}; validation loss {distill['val_loss_before']} -> {distill['val_loss_after']} "
              f"({distill['val_tokens']} held-out tokens)")
    print("\n## Targets\n")
    print(report.targets_table(results.get("targets", [])))
    if results.get("section_errors"):
        print(f"\nsection errors: {results['section_errors']}")


if __name__ == "__main__":
    sys.exit(main())
