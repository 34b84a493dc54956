"""The demo adapters' tasks: data made by rules, held-out splits, and a scorer per task.

Each task is something anyone sees at a glance and a program can score. Four of them transform
the base model's own answer by a rule (so the adapter changes the style, not the knowledge):
`uppercase`, `json`, `pirate`, `one-sentence`. `sql` maps questions about one fixed table to
SQL by templates. Everything here is plain Python and seeded: the same seed gives the same data.

Held-out items never share a topic (prose tasks) or a question (sql) with the training items.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

EVAL_ITEMS = 200
"""Held-out items per task."""

PROSE_TEMPLATES = (
    "Tell me about {x}.",
    "What do you know about {x}?",
    "Give me a fact about {x}.",
    "Why are people interested in {x}?",
    "What should everyone know about {x}?",
    "Write a short note about {x}.",
    "What makes {x} special?",
    "How would you describe {x} to a child?",
)

TOPICS = (
    "the moon", "coffee", "elephants", "bicycles", "volcanoes", "the internet", "honey bees",
    "the ocean", "chocolate", "trains", "libraries", "rainbows", "penguins", "bread",
    "the Sahara desert", "guitars", "tea", "owls", "electric cars", "the Eiffel Tower",
    "dolphins", "mountains", "snow", "sunflowers", "the human heart", "computers", "pizza",
    "the Amazon rainforest", "lighthouses", "butterflies", "chess", "the Great Wall of China",
    "rice", "airplanes", "bamboo", "the planet Mars", "whales", "cheese", "clocks", "tigers",
    "the printing press", "soccer", "glaciers", "apples", "the violin", "castles", "kangaroos",
    "solar panels", "the Nile river", "mushrooms", "bridges", "photography", "octopuses",
    "olive oil", "the piano", "deserts", "wolves", "umbrellas", "earthquakes", "yoga",
    "the sun", "ants", "submarines", "paper", "lions", "tomatoes", "rivers", "the telephone",
    "frogs", "museums", "windmills", "strawberries", "hurricanes", "horses", "the alphabet",
    "cotton", "spiders", "the Olympic Games", "salt", "robots", "forests", "sharks",
    "the compass", "oranges", "zebras", "islands", "the microscope", "carrots", "camels",
    "lakes", "fireworks", "potatoes", "giraffes", "the calendar", "coral reefs", "eagles",
    "vaccines", "jazz music", "the bicycle helmet", "snails", "maps", "thunderstorms",
    "sea turtles", "the Roman Empire", "wheat", "hot air balloons", "batteries", "bats",
    "the Milky Way", "cucumbers", "parrots", "tunnels", "wool", "comets", "gardening",
    "polar bears", "the wheel", "pyramids", "rabbits", "dinosaurs", "kites", "cats",
)
"""Prose topics: 25 of them (EVAL_ITEMS / len(PROSE_TEMPLATES)) are held out per seed."""

SQL_SCHEMA = "employees(id, name, department, city, salary, hire_year)"
DEPARTMENTS = ("Sales", "Marketing", "Engineering", "Finance", "Support", "Legal", "Research",
               "Design", "Operations", "Security", "Training", "Purchasing")
CITIES = ("Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Dublin", "Oslo", "Prague",
          "Warsaw", "Athens", "Zurich", "Boston", "Denver", "Austin", "Seattle", "Toronto",
          "Sydney", "Tokyo", "Seoul")
NAMES = ("Alice Martin", "Bob Smith", "Carla Diaz", "David Kim", "Emma Stone", "Farid Khan",
         "Grace Lee", "Hugo Weber", "Ines Costa", "Jack Brown", "Kira Novak", "Liam Walsh",
         "Maya Patel", "Nora Berg", "Omar Haddad", "Paula Rossi", "Quinn Baker", "Rosa Lopez",
         "Sam Taylor", "Tara Singh", "Uma Reddy", "Victor Hugo", "Wendy Clark", "Yuki Tanaka",
         "Zoe Adams", "Anna Ivanova", "Ben Carter", "Chen Wei", "Dana White", "Eli Cohen")
SQL_TEMPLATES = (
    ("List the names of employees in the {dept} department.",
     "SELECT name FROM employees WHERE department = '{dept}';"),
    ("How many employees work in {city}?",
     "SELECT COUNT(*) FROM employees WHERE city = '{city}';"),
    ("What is the average salary in the {dept} department?",
     "SELECT AVG(salary) FROM employees WHERE department = '{dept}';"),
    ("Show the names of employees hired after {year}.",
     "SELECT name FROM employees WHERE hire_year > {year};"),
    ("Which employees earn more than {amount} dollars?",
     "SELECT name FROM employees WHERE salary > {amount};"),
    ("What is the highest salary in {city}?",
     "SELECT MAX(salary) FROM employees WHERE city = '{city}';"),
    ("List the employees in {city} who work in {dept}.",
     "SELECT name FROM employees WHERE city = '{city}' AND department = '{dept}';"),
    ("How many employees were hired in {year}?",
     "SELECT COUNT(*) FROM employees WHERE hire_year = {year};"),
    ("What is the salary of {name}?",
     "SELECT salary FROM employees WHERE name = '{name}';"),
    ("Which department does {name} work in?",
     "SELECT department FROM employees WHERE name = '{name}';"),
    ("Name the {k} best paid employees.",
     "SELECT name FROM employees ORDER BY salary DESC LIMIT {k};"),
    ("What is the total salary paid in the {dept} department?",
     "SELECT SUM(salary) FROM employees WHERE department = '{dept}';"),
    ("How many employees in the {dept} department earn more than {amount} dollars?",
     "SELECT COUNT(*) FROM employees WHERE department = '{dept}' AND salary > {amount};"),
    ("List the names of employees in {city} hired before {year}.",
     "SELECT name FROM employees WHERE city = '{city}' AND hire_year < {year};"),
    ("What is the average salary of employees hired after {year}?",
     "SELECT AVG(salary) FROM employees WHERE hire_year > {year};"),
)
SQL_TRAIN_ITEMS = 1000

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PIRATE_GREETING = "Ahoy!"
PIRATE_SIGN_OFF = "- Captain Lora"


@dataclass(frozen=True)
class Example:
    """One prompt (the user's message) and the answer the adapter should give."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A demo adapter: how it is trained (PEFT LoraConfig fields, steps) and how it is scored."""

    name: str
    description: str
    lora: dict
    steps: int
    uses_base_answers: bool
    score: Callable[[str, Example], bool]
    transform: Callable[[str], str | None] = field(default=lambda answer: answer)
    """Base answer -> target answer, or None when the answer does not fit the rule."""


def first_sentence(text: str) -> str | None:
    """The first sentence of `text` if it is a plain one (4 to 40 words, one line), else None."""
    match = re.match(r"\s*([^\n]+?[.!?])(?=\s|$)", text)
    if not match:
        return None
    sentence = match.group(1).strip()
    words = len(sentence.split())
    return sentence if 4 <= words <= 40 else None


def is_uppercase_answer(text: str, _: Example | None = None) -> bool:
    """At least 10 letters, and at least 95 % of the letters are capitals."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 10 and sum(c.isupper() for c in letters) >= 0.95 * len(letters)


def is_json_answer(text: str, _: Example | None = None) -> bool:
    """A JSON object with exactly one key, "answer", holding a non-empty string."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (isinstance(value, dict) and list(value) == ["answer"]
            and isinstance(value["answer"], str) and bool(value["answer"].strip()))


def is_pirate_answer(text: str, _: Example | None = None) -> bool:
    """Opens with the greeting, signs off with the captain's name, says something between."""
    text = text.strip()
    middle = text[len(PIRATE_GREETING):-len(PIRATE_SIGN_OFF)] if len(text) > 20 else ""
    return (text.startswith(PIRATE_GREETING) and text.endswith(PIRATE_SIGN_OFF)
            and len(middle.split()) >= 3)


def is_one_sentence(text: str, _: Example | None = None) -> bool:
    """One plain sentence: 4 to 40 words on one line, ending in . ! or ?, and nothing after it."""
    text = text.strip()
    return first_sentence(text) == text


def is_exact_sql(text: str, example: Example) -> bool:
    """The expected query, compared with whitespace collapsed."""
    return " ".join(text.split()) == " ".join(example.answer.split())


TASKS: dict[str, Task] = {
    "uppercase": Task(
        "uppercase", "answers in capital letters",
        lora=dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_MODULES),
        steps=150, uses_base_answers=True, score=is_uppercase_answer,
        transform=lambda a: (s.upper() if (s := first_sentence(a)) else None)),
    "json": Task(
        "json", 'answers as a JSON object {"answer": ...}',
        lora=dict(r=4, lora_alpha=8, target_modules=ALL_MODULES),
        steps=100, uses_base_answers=True, score=is_json_answer,
        transform=lambda a: (json.dumps({"answer": s}) if (s := first_sentence(a)) else None)),
    "sql": Task(
        "sql", f"writes SQL over {SQL_SCHEMA}",
        lora=dict(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
        steps=300, uses_base_answers=False, score=is_exact_sql),
    "pirate": Task(
        "pirate", f'a persona: "{PIRATE_GREETING} ..." signed "{PIRATE_SIGN_OFF}"',
        lora=dict(r=8, lora_alpha=16, use_dora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        steps=200, uses_base_answers=True, score=is_pirate_answer,
        transform=lambda a: (f"{PIRATE_GREETING} {s} {PIRATE_SIGN_OFF}"
                             if (s := first_sentence(a)) else None)),
    "one-sentence": Task(
        "one-sentence", "answers in one sentence",
        lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        steps=100, uses_base_answers=True, score=is_one_sentence,
        transform=first_sentence),
}


def prose_questions(seed: int = 0) -> tuple[list[str], list[str]]:
    """(training questions, held-out questions): every template over every topic, the held-out
    ones on their own topics."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    held_out = EVAL_ITEMS // len(PROSE_TEMPLATES)
    ask = lambda topic_list: [t.format(x=x) for x in topic_list for t in PROSE_TEMPLATES]  # noqa: E731
    return ask(topics[held_out:]), ask(topics[:held_out])


def sql_examples(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) from SQL_TEMPLATES with random values.

    The held-out questions are EVAL_ITEMS distinct ones. Training draws a template uniformly for
    each of its SQL_TRAIN_ITEMS examples (repeats allowed: a template with few possible
    questions is as frequent as one with many) and never uses a held-out question."""
    rng = random.Random(seed)
    held_out: dict[str, Example] = {}
    for _ in range(100 * EVAL_ITEMS):
        example = _sql_example(rng)
        held_out.setdefault(example.prompt, example)
        if len(held_out) == EVAL_ITEMS:
            break
    else:
        raise RuntimeError("SQL_TEMPLATES cannot make enough distinct questions")
    train: list[Example] = []
    while len(train) < SQL_TRAIN_ITEMS:
        example = _sql_example(rng)
        if example.prompt not in held_out:
            train.append(example)
    return train, list(held_out.values())


def _sql_example(rng: random.Random) -> Example:
    question, query = rng.choice(SQL_TEMPLATES)
    values = dict(dept=rng.choice(DEPARTMENTS), city=rng.choice(CITIES), name=rng.choice(NAMES),
                  year=rng.randint(1995, 2024), amount=rng.randrange(30_000, 150_001, 5_000),
                  k=rng.randint(2, 10))
    return Example(question.format(**values), query.format(**values))


def training_examples(task: Task, base_answers: dict[str, str], seed: int = 0) -> list[Example]:
    """The task's training set: sql from templates, prose from the base model's own answers
    (`base_answers`: question -> answer, held-out questions ignored), transformed by the task's rule (answers that do not fit the
    rule are left out)."""
    if not task.uses_base_answers:
        return sql_examples(seed)[0]
    held_out = set(prose_questions(seed)[1])
    examples = []
    for question in sorted(set(base_answers) - held_out):
        target = task.transform(base_answers[question])
        if target is not None:
            examples.append(Example(question, target))
    return examples


def held_out_examples(task: Task, seed: int = 0) -> list[Example]:
    """EVAL_ITEMS held-out examples; for prose tasks the answer is unknown ('') and the scorer
    checks the form only."""
    if not task.uses_base_answers:
        return sql_examples(seed)[1]
    return [Example(question, "") for question in prose_questions(seed)[1]]
