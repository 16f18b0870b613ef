"""Generate the offline demo corpus: templated questions with correct, worked answers.

`HF_DATASET_NAME=demo uv run dataset.py` builds a dataset from these rows, so the whole pipeline
runs with no network. They use natural_reasoning's columns (`question`, `reference_answer`) and so
become the same question-and-answer documents (documents.qa_document). Every row comes from a
seeded generator: the same corpus on every machine, small enough to tokenize quickly and regular
enough that a 2-layer model visibly learns its formats on a CPU.
"""

import random

DOCUMENTS = 40_000
SEED = 2024

# (plural, singular, smaller unit, how many of the smaller unit make one)
UNITS = [
    ("meters", "meter", "centimeters", 100),
    ("kilometers", "kilometer", "meters", 1000),
    ("kilograms", "kilogram", "grams", 1000),
    ("liters", "liter", "milliliters", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("feet", "foot", "inches", 12),
    ("yards", "yard", "feet", 3),
]
MOVERS = ["car", "train", "cyclist", "runner", "boat", "bus", "drone", "horse"]


def addition(rng):
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    question = rng.choice(["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."])
    return question.format(a=a, b=b), f"{a} + {b} = {a + b}."


def subtraction(rng):
    a, b = sorted((rng.randint(1, 999), rng.randint(1, 999)), reverse=True)
    question = rng.choice(["What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}."])
    return question.format(a=a, b=b), f"{a} - {b} = {a - b}."


def multiplication(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    question = rng.choice(["What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}."])
    return question.format(a=a, b=b), f"{a} * {b} = {a * b}."


def division(rng):
    b, quotient = rng.randint(2, 20), rng.randint(2, 50)
    a = b * quotient  # whole answers only
    question = rng.choice(["What is {a} / {b}?", "Compute {a} divided by {b}.", "Divide {a} by {b}."])
    return question.format(a=a, b=b), f"{a} / {b} = {quotient}."


def conversion(rng):
    big, one, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 60)
    if rng.random() < 0.5:
        return (f"How many {small} are in {n} {big}?",
                f"One {one} is {factor} {small}, so {n} {big} is {n} * {factor} = {n * factor} {small}.")
    return (f"How many {big} are {n * factor} {small}?",
            f"One {one} is {factor} {small}, so {n * factor} {small} is {n * factor} / {factor} = {n} {big}.")


def distance(rng):
    v, t = rng.randint(2, 40), rng.randint(2, 60)
    return (f"A {rng.choice(MOVERS)} moves at {v} m/s for {t} s. How far does it go?",
            f"Distance = speed * time = {v} m/s * {t} s = {v * t} m.")


def speed(rng):
    v, t = rng.randint(2, 40), rng.randint(2, 60)
    return (f"A {rng.choice(MOVERS)} covers {v * t} m in {t} s. What is its average speed?",
            f"Speed = distance / time = {v * t} m / {t} s = {v} m/s.")


def travel_time(rng):
    v, t = rng.randint(2, 30) * 10, rng.randint(1, 9)
    return (f"How long does a {rng.choice(MOVERS)} take to travel {v * t} km at {v} km/h?",
            f"Time = distance / speed = {v * t} km / {v} km/h = {t} h.")


def acceleration(rng):
    a, t = rng.randint(1, 12), rng.randint(2, 20)
    return (f"A {rng.choice(MOVERS)} starts from rest and accelerates at {a} m/s^2 for {t} s. "
            f"What is its final speed?",
            f"Final speed = acceleration * time = {a} m/s^2 * {t} s = {a * t} m/s.")


def free_fall(rng):
    t = rng.randint(1, 12)
    return (f"A stone is dropped from rest. How far does it fall in {t} s? Use g = 10 m/s^2.",
            f"Distance = 1/2 * g * t^2 = 0.5 * 10 * {t}^2 = {5 * t * t} m.")


TEMPLATES = [addition, subtraction, multiplication, division, conversion,
             distance, speed, travel_time, acceleration, free_fall]


def rows(documents=DOCUMENTS, seed=SEED):
    """Yield `documents` rows {question, reference_answer}, always the same ones for a seed."""
    rng = random.Random(seed)
    for _ in range(documents):
        question, answer = rng.choice(TEMPLATES)(rng)
        yield {"question": question, "reference_answer": answer}
