"""This module says what a training document looks like, and so how a trained model is asked a question.

dataset.py turns every natural_reasoning row into one `Question: ...\nAnswer: ...` document
(preceded by <|endoftext|>, as every document is). generate.py and prompt.py ask in the same form,
and prompt.py ends an answer where the model starts the next question.
"""

NEXT_QUESTION = "\nQuestion:"  # where a model that has answered goes on to ask itself something


def question_prompt(question):
    """Return a question in the form the model saw in training, ready for the model to answer."""
    return f"Question: {question}\nAnswer:"


def qa_document(question, answer):
    """Return a training document: the question's prompt, then the answer."""
    return f"{question_prompt(question)} {answer}"
