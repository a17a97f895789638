"""Named chat templates (`chat_template: llama3`, `gemma3`, `qwen_25`...): each model family's published
prompt format, written here as a Jinja template for the roles dolphin-train's rows carry (system, user,
assistant, tool; text contents).

The template is set on the tokenizer and saved with it, so `apply_chat_template`, vLLM and GGUF converters
format prompts exactly as training did; training renders it through `TokenizerTemplate` (templates.py) under
the same masking rule as ChatML. For each format we also name the tokens it needs as single tokens (added
to the vocabulary when missing, like ChatML's markers) and its end-of-turn token (trained after each trained
turn). Names and rendered text follow axolotl 0.19's templates of the same name, token for token
(`scripts/template_parity.py`); where the published format depends on the day (a "today" date), the date is
fixed so that preparing the same data twice gives the same tokens (pass `date_string` at inference).
"""

from __future__ import annotations

from dataclasses import dataclass

# Stands for the tokenizer's own eos token in `end_tokens`: these formats close assistant turns with it.
EOS = "{eos}"


@dataclass(frozen=True)
class NamedTemplate:
    jinja: str
    end_tokens: tuple[str, ...]  # the end-of-turn token(s) written right after a turn's content
    markers: tuple[str, ...]  # tokens the format needs as single tokens of the vocabulary


def _alternating(first_role: str = "user") -> str:
    """A Jinja check that the turns alternate user/assistant, as several formats require."""
    return (
        "{% if (message.role == '" + first_role + "') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('this chat template needs turns that alternate user/assistant, starting with "
        + first_role
        + "') }}{% endif %}"
    )


def _only(roles: str, name: str) -> str:
    return (
        "{{ raise_exception('the "
        + name
        + " chat template has no ' + message.role + ' role (it takes "
        + roles
        + ")') }}"
    )


# A system turn that opens the conversation is taken out of the loop by most formats.
_SPLIT_SYSTEM = (
    "{% if messages and messages[0].role == 'system' %}{% set system_message = messages[0].content %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
)

# Llama 3 / 3.1 Instruct: header, blank line, trimmed content, <|eot_id|>.
LLAMA3 = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Llama 3.2 Instruct: a system turn always opens with the knowledge cut-off and the date; tool results are
# `ipython` turns whose text is written as a JSON string.
LLAMA3_2 = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}{% set system_message = messages[0].content | trim %}"
    "{% set turns = messages[1:] %}{% else %}{% set system_message = '' %}{% set turns = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: {{ date_string | default('26 Jul 2024') }}\n\n{{ system_message }}<|eot_id|>"
    "{% for message in turns %}"
    "{% if message.role in ('tool', 'ipython') %}"
    "<|start_header_id|>ipython<|end_header_id|>\n\n{{ message.content | tojson }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content | trim }}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Llama 4: <|header_start|>/<|header_end|>, <|eot|>; the system text is trimmed, other contents are not.
LLAMA4 = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}"
    "<|header_start|>system<|header_end|>\n\n{{ messages[0].content | trim }}<|eot|>"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message.role in ('tool', 'ipython') %}"
    "<|header_start|>ipython<|header_end|>\n\n{{ message.content | tojson }}<|eot|>"
    "{% else %}<|header_start|>{{ message.role }}<|header_end|>\n\n{{ message.content }}<|eot|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)

# Gemma (1 and 2): no system role; the assistant is `model`; contents trimmed.
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{{ raise_exception('the gemma chat template has no system role (drop_system_message: true removes it)') }}"
    "{% endif %}" + _alternating() + "<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}\n"
    "{{ message.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Gemma 3: the system text (untrimmed) and a blank line open the first user turn.
GEMMA3 = (
    "{{ bos_token }}"
    "{% if messages and messages[0].role == 'system' %}{% set prefix = messages[0].content + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    + _alternating()
    + "<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}\n"
    "{% if loop.first %}{{ prefix }}{% endif %}{{ message.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Phi-3: a user turn ends by opening the assistant's (`<|assistant|>` follows it directly).
PHI_3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'system' %}<|system|>\n{{ message.content }}<|end|>\n"
    "{% elif message.role == 'user' %}<|user|>\n{{ message.content }}<|end|>\n<|assistant|>\n"
    "{% elif message.role == 'assistant' %}{{ message.content }}<|end|>\n"
    "{% else %}" + _only("system, user and assistant", "phi_3") + "{% endif %}{% endfor %}"
)

# Phi-3.5: no BOS; every turn has its own header; an empty system text writes no system turn.
PHI_35 = (
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{% if message.content %}<|system|>\n{{ message.content }}<|end|>\n{% endif %}"
    "{% elif message.role in ('user', 'assistant') %}<|{{ message.role }}|>\n{{ message.content }}<|end|>\n"
    "{% else %}" + _only("system, user and assistant", "phi_35") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Qwen tool results: consecutive tool turns share one user turn, each inside <tool_response> tags. (A newline
# right after a tag is written as an expression: transformers' Jinja environment drops it otherwise.)
_QWEN_TOOL = (
    "{% if loop.first or loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>\n{% endif %}"
)

# Qwen 2.5: ChatML with Qwen's default system message when the conversation has none.
QWEN_25 = (
    "{% if messages and messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% set turns = messages[1:] %}{% else %}"
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% if message.role == 'tool' %}" + _QWEN_TOOL + "{% else %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen 3: ChatML; the answer after the last real user question carries its reasoning in <think> tags (an
# empty block when there is none), earlier answers keep only the text after </think>.
QWEN3 = (
    "{% if messages and messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% set ns = namespace(last_query=messages | length - 1, looking=true) %}"
    "{% for message in messages | reverse %}"
    "{% if ns.looking and message.role == 'user' and not (message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}"
    "{% set ns.looking = false %}{% set ns.last_query = messages | length - 1 - loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}{% set content = message.content %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "<|im_start|>assistant\n<think>\n{{ reasoning.strip('\n') }}\n</think>\n\n{{ content.lstrip('\n') }}"
    "{% else %}<|im_start|>assistant\n{{ content }}{% endif %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}" + _QWEN_TOOL + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n\n{% endif %}{% endif %}"
)

# DeepSeek-V2.5: the system text, a blank line, then <｜User｜>/<｜Assistant｜> turns; answers end with EOS.
DEEPSEEK_V2 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.role == 'user' %}<｜User｜>{{ message.content }}"
    "{% elif message.role == 'assistant' %}<｜Assistant｜>{{ message.content }}{{ eos_token }}"
    "{% elif message.role == 'system' %}{{ message.content }}\n\n"
    "{% else %}" + _only("system, user and assistant", "deepseek_v2") + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

# Mistral v1 (7B v0.1, Mixtral 8x7B): [INST] is plain text here; the system text opens the first user turn.
MISTRAL_V1 = (
    _SPLIT_SYSTEM + "{{ bos_token }}{% for message in turns %}" + _alternating() + "{% if message.role == 'user' %}"
    "{% if loop.first and system_message is defined %} [INST] {{ system_message }}\n\n{{ message.content }} [/INST]"
    "{% else %} [INST] {{ message.content }} [/INST]{% endif %}"
    "{% else %} {{ message.content }}{{ eos_token }}{% endif %}{% endfor %}"
)

# Mistral v3 (Tekken vocabulary, e.g. Mistral Nemo): [INST] control tokens, no spaces; the system text opens
# the last user turn, the one a served prompt ends with.
MISTRAL_V3_TEKKEN = (
    _SPLIT_SYSTEM + "{% set ns = namespace(last_user=-1) %}"
    "{% for message in turns %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
    "{% endfor %}{{ bos_token }}{% for message in turns %}" + _alternating() + "{% if message.role == 'user' %}"
    "{% if loop.index0 == ns.last_user and system_message is defined %}"
    "[INST]{{ system_message }}\n\n{{ message.content }}[/INST]"
    "{% else %}[INST]{{ message.content }}[/INST]{% endif %}"
    "{% else %}{{ message.content }}{{ eos_token }}{% endif %}{% endfor %}"
)

_MISTRAL_SMALL_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered "
    "in Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date is ' + "
    "(date_string | default('2025-01-30')) + '.\\n\\nWhen you\\'re not sure about some information, you say that "
    "you don\\'t have the information and don\\'t make up anything.\\nIf the user\\'s question is not clear, "
    "ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to "
    'answer it right away and you rather ask the user to clarify their request (e.g. "What are some good '
    'restaurants around me?" => "Where are you?" or "When is the next flight to Tokyo" => "Where do you '
    'travel from?")'
)

# Mistral v7 (Tekken, Mistral Small 3): a [SYSTEM_PROMPT] block always opens the conversation (Mistral's
# default text when there is no system turn).
MISTRAL_V7_TEKKEN = (
    "{{ bos_token }}{% if messages and messages[0].role == 'system' %}{% set system_message = messages[0].content %}"
    "{% set turns = messages[1:] %}{% else %}{% set system_message = '" + _MISTRAL_SMALL_SYSTEM + "' %}"
    "{% set turns = messages %}{% endif %}[SYSTEM_PROMPT]{{ system_message }}[/SYSTEM_PROMPT]"
    "{% for message in turns %}{% if message.role == 'user' %}[INST]{{ message.content }}[/INST]"
    "{% elif message.role == 'system' %}[SYSTEM_PROMPT]{{ message.content }}[/SYSTEM_PROMPT]"
    "{% elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}"
    "{% else %}" + _only("system, user and assistant", "mistral_v7_tekken") + "{% endif %}{% endfor %}"
)

# Cohere Command-R: turn tokens; user and assistant contents trimmed.
COHERE = (
    "{{ bos_token }}{% if messages and messages[0].role == 'system' %}"
    "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{ messages[0].content }}<|END_OF_TURN_TOKEN|>"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}" + _alternating() + "{% if message.role == 'user' %}"
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ message.content | trim }}<|END_OF_TURN_TOKEN|>"
    "{% else %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{{ message.content | trim }}<|END_OF_TURN_TOKEN|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)

# Falcon-H1: BOS, then ChatML.
FALCON_H1 = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 4: `<|turn>role\n ... <turn|>\n` turns, the assistant is `model`, contents trimmed. The system text
# (first turn only) gets its own turn, headed by `<|think|>` when the prompt asks for thinking
# (`enable_thinking`); an answer's thought blocks (`<|channel>...<channel|>`) are left out of the history; an
# answer right after another answer continues the same model turn. A generation prompt without thinking
# opens an empty thought block. Tool results belong inside the model turn that called the tool (structured
# tool calls, which these rows do not carry), so a plain `tool` turn is refused.
GEMMA4 = (
    "{{ bos_token }}{% set thinking = enable_thinking is defined and enable_thinking %}"
    "{% set has_system = messages and messages[0].role in ('system', 'developer') %}"
    "{% if thinking or has_system %}<|turn>system\n{% if thinking %}<|think|>\n{% endif %}"
    "{% if has_system %}{{ messages[0].content | trim }}{% endif %}<turn|>\n{% endif %}"
    "{% set ns = namespace(previous='', text='') %}"
    "{% for message in (messages[1:] if has_system else messages) %}"
    "{% if message.role == 'tool' %}{{ raise_exception('the gemma4 chat template writes tool results inside the "
    "model turn that called the tool; rows with plain tool turns are not supported') }}{% endif %}"
    "{% if message.role == 'assistant' %}{% if ns.previous != 'assistant' %}<|turn>model\n{% endif %}"
    "{% set ns.text = '' %}{% for part in message.content.split('<channel|>') %}"
    "{% set ns.text = ns.text + part.split('<|channel>')[0] %}{% endfor %}{{ ns.text | trim }}"
    "{% else %}<|turn>{{ message.role }}\n{{ message.content | trim }}{% endif %}<turn|>\n"
    "{% set ns.previous = message.role %}{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% if not thinking %}<|channel>thought\n<channel|>{% endif %}"
    "{% endif %}"
)

_LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
_PHI_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_GEMMA4_MARKERS = ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>")

NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    "llama3": NamedTemplate(LLAMA3, ("<|eot_id|>",), _LLAMA3_MARKERS),
    "llama3_2": NamedTemplate(LLAMA3_2, ("<|eot_id|>",), _LLAMA3_MARKERS),
    "llama4": NamedTemplate(LLAMA4, ("<|eot|>",), ("<|header_start|>", "<|header_end|>", "<|eot|>")),
    "gemma": NamedTemplate(GEMMA, ("<end_of_turn>",), ("<start_of_turn>", "<end_of_turn>")),
    "gemma3": NamedTemplate(GEMMA3, ("<end_of_turn>",), ("<start_of_turn>", "<end_of_turn>")),
    "gemma3n": NamedTemplate(GEMMA3, ("<end_of_turn>",), ("<start_of_turn>", "<end_of_turn>")),  # same text turns
    "gemma4": NamedTemplate(GEMMA4, ("<turn|>",), _GEMMA4_MARKERS),
    "gemma4_unified": NamedTemplate(GEMMA4, ("<turn|>",), _GEMMA4_MARKERS),  # the same text turns
    "phi_3": NamedTemplate(PHI_3, ("<|end|>",), _PHI_MARKERS),
    "phi_35": NamedTemplate(PHI_35, ("<|end|>",), _PHI_MARKERS),
    "qwen_25": NamedTemplate(QWEN_25, ("<|im_end|>",), _CHATML_MARKERS),
    "qwen3": NamedTemplate(QWEN3, ("<|im_end|>",), _CHATML_MARKERS),
    "deepseek_v2": NamedTemplate(DEEPSEEK_V2, (EOS,), ("<｜User｜>", "<｜Assistant｜>")),
    "mistral_v1": NamedTemplate(MISTRAL_V1, (EOS,), ()),
    "mistral_v3_tekken": NamedTemplate(MISTRAL_V3_TEKKEN, (EOS,), ("[INST]", "[/INST]")),
    "mistral_v7_tekken": NamedTemplate(
        MISTRAL_V7_TEKKEN, (EOS,), ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
    ),
    "cohere": NamedTemplate(
        COHERE,
        ("<|END_OF_TURN_TOKEN|>",),
        ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"),
    ),
    "falcon_h1": NamedTemplate(FALCON_H1, ("<|im_end|>",), _CHATML_MARKERS),
}


def end_tokens_for(name: str, eos_token: str | None) -> list[str]:
    """The format's end-of-turn tokens, with the tokenizer's eos token where the format writes it."""
    return [eos_token if t == EOS else t for t in NAMED_TEMPLATES[name].end_tokens if t != EOS or eos_token]
