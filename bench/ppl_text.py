'''The fixed text for the perplexity benchmark: original prose and code written for this project
(public domain, CC0), about 2,500 tokens with the Qwen2 tokenizer. Never change it once results are
published: perplexities are only comparable on the same text.'''

from __future__ import annotations

PPL_TEXT = """The Still House

At the edge of the village, where the road bends toward the river, there is a low stone building that everyone calls the still house. Nobody has distilled anything in it for a hundred years, but the name stayed, the way names do. When I was a child the building held the village library, two rooms of shelves that smelled of paper and damp wool, and a reading table so old that the wood had worn into soft hollows where a century of elbows had rested.

The librarian was a tall woman named Margaret who wore the same grey cardigan every day of the year. She kept a ledger in which she wrote the title of every book that left the building and the name of the person who took it. She did not trust the computer that the county had sent her, and she did not need it. If you asked her for a book about bees, she would walk to the right shelf without looking, run one finger along the spines, and hand you three volumes, one of which you had not known you wanted.

I spent most of my Saturdays there. In winter the stove in the corner ticked as it heated, and the windows fogged so that the river outside became a grey smear of light. In summer the door stood open, and swallows flew in under the eaves and out again. I read everything: adventure stories, histories of the Roman roads, a manual on the repair of clocks, a field guide to mushrooms that I was forbidden to use without an adult. Margaret never told me that a book was too old or too young for me. She only asked, when I brought one back, what I had thought of it, and she listened to the answer as though it mattered.

Years later, when I had moved to the city and worked in an office with a view of other offices, I understood what she had been doing. She had been teaching me to distill. Not spirits, of course, but the harder thing: to take a great deal of material and boil it down to what matters, to keep the essence and let the rest evaporate. Every time I summarized a book for her, I was practicing the skill I now use every day, when a report of forty pages must become a paragraph that a busy person will actually read.

There is a parallel in the way modern language models are built. A very large model is trained first, at great expense, on an enormous amount of text. It is slow and costly to run. Then a smaller model, the student, is trained to imitate the large one, the teacher. The student does not see the whole world the teacher saw; it sees the teacher's answers, and it learns to produce answers that look like them. The result is a model that is much cheaper to run and that keeps a surprising amount of the teacher's ability. Engineers call this process distillation, and I like to think that Margaret would have approved of the name.

A distilled model can be made smaller still by quantization. The numbers inside a neural network, its weights, are usually stored with sixteen or thirty-two bits each. Many of those bits carry very little information. If we round each weight to one of two hundred and fifty-six levels, we need only eight bits; if we accept sixteen levels, four bits are enough. The trick is to choose the levels well. A common approach keeps a separate scale for every row of a weight matrix, or for every small group of numbers within a row, so that a few large values do not force all the small ones to be rounded to zero.

Why does the size of the weights matter so much? Because generating text one word at a time is, on most computers, limited by memory rather than by arithmetic. To produce each new token, the model must read every one of its weights from memory. A processor can multiply numbers far faster than memory can deliver them, so the processor spends most of its time waiting. Halve the number of bytes, and you very nearly double the speed. This is also why serving many users at once is efficient: when several requests are processed in the same step, they share a single pass over the weights.

Here is a small example of the idea in code. The function below quantizes the rows of a matrix to eight-bit integers, keeping one scale per row, and a second function turns the integers back into approximate floating-point values.

import numpy as np


def quantize_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    \"\"\"Symmetric int8 quantization with one scale per output row.\"\"\"
    max_abs = np.abs(weights).max(axis=1, keepdims=True)
    scales = np.where(max_abs == 0, 1.0, max_abs / 127.0)
    codes = np.clip(np.round(weights / scales), -127, 127).astype(np.int8)
    return codes, scales.astype(np.float32)


def dequantize_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales


def relative_error(weights: np.ndarray) -> float:
    codes, scales = quantize_rows(weights)
    restored = dequantize_rows(codes, scales)
    return float(np.linalg.norm(weights - restored) / np.linalg.norm(weights))


if __name__ == "__main__":
    rng = np.random.default_rng(seed=42)
    matrix = rng.normal(size=(1024, 1024)).astype(np.float32)
    print(f"relative error: {relative_error(matrix):.4%}")

When you run this on a matrix of random numbers, the relative error is well under one percent. Real weight matrices are not random, and some of them contain outliers, which is why more careful methods exist. Still, the principle is the same, and it explains why a model stored in eight bits usually behaves almost exactly like the original.

The village has changed since I was a child. The library moved to a new building next to the school, with glass walls and a row of computers, and the still house was sold. For a few years it stood empty. Then a young couple bought it and turned it into a bakery. They kept the stone walls and the old reading table, which now holds baskets of bread. On Saturday mornings there is a queue out the door, and the smell of the ovens drifts down to the river.

I went back last spring and stood in the queue with everyone else. When I reached the counter I asked the baker whether she knew what the building used to be. She said she had heard it was a distillery once, a long time ago. I told her that when I was young it had been a library, and that the librarian had known where every book was without looking. She smiled and said that she could find any loaf in the shop with her eyes closed, which I believed.

On the way home I thought about the things that are worth keeping. A building can change its purpose three times and keep its name. A model can shrink to a quarter of its size and keep most of what it knew. A person can forget the titles of almost every book she read as a child and still remember the woman in the grey cardigan who asked her what she thought. What survives the boiling down is not always what we expect, but it is usually what matters.

A Short Guide to Keeping a Server Healthy

Anyone who runs a service for other people learns a few rules, usually the hard way. The first rule is that every queue must have a limit. If requests arrive faster than the server can answer them and the queue is allowed to grow without bound, the server will eventually run out of memory and fail for everyone, including the people who were patient. It is far better to refuse some requests early, with a clear message that tells the client when to try again, than to accept them all and serve none.

The second rule is that a single bad request must never bring down the others. Inputs will be malformed, too long, or designed to cause trouble. Each request should be checked at the door, and a problem with one should produce an error for that one alone. When work is processed in batches, this takes care: a failure in the middle of a batch must be traced back to the request that caused it, and the rest of the batch must continue.

The third rule is that the server must tell the truth about itself. It should report whether it is ready to accept work, how many requests are waiting, how many are running, and how quickly it is producing results. An autoscaler can only make good decisions with good numbers. A server that says it is ready before its model has finished loading will receive traffic it cannot handle, and the first users of the day will see errors instead of answers.

The fourth rule is that measurements beat opinions. It is easy to believe that a particular optimization will make the service faster, and it is common to be wrong. The only way to know is to measure, on the same machine, with the same inputs, before and after the change, and to write down the numbers together with the command that produced them. A benchmark that cannot be repeated is only an anecdote.

The following configuration file shows how these rules might look in practice for a small deployment:

server:
  port: 8080
  max_batch_size: 8
  max_queue: 32
  request_timeout_seconds: 600
model:
  name: distilled-qwen-1.5b
  quantization: int8
  max_model_len: 4096
autoscaling:
  min_replicas: 1
  max_replicas: 4
  target_queue_depth: 4
  scale_down_delay_seconds: 300

Each value is a decision. The batch size trades the latency of a single request against the total throughput of the machine. The queue limit decides how much waiting is acceptable before the server starts to refuse work. The timeout protects the server from requests that would otherwise hold a slot forever. The autoscaling target says how long a queue may grow before another replica should be started, and the delay before scaling down keeps the system from starting and stopping replicas every few seconds when the load hovers near the threshold.

None of these numbers is correct in general. They depend on the model, the hardware, and the people who use the service. The right way to choose them is to start with reasonable defaults, watch the metrics, and adjust one value at a time. Margaret, who kept her ledger by hand for forty years and never lost a book, would have understood that perfectly well.
"""
