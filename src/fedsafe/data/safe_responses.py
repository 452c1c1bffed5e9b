"""Offline safe responses for harmful prompts (the *aligned* data of benign clients and of the defense).

The paper's aligned data comes from an LLM asked for "a safe response" (Level 2/3, App. C.2). Offline we
compose one from phrase banks instead. A single canned refusal would teach the model one string, and a
keyword judge would then measure string memorisation rather than refusal, so responses vary along four
axes, each picked by a seeded RNG keyed on the prompt:

* an **opening** (the refusal itself; 20 phrasings),
* an optional **reason**, tailored to a coarse topic found by keywords (weapons, drugs, hacking,
  self-harm, hate, fraud, privacy, misinformation, or general),
* an optional **safe alternative** for the same topic,
* an optional **closing** (10 phrasings).

About a quarter of the responses are brief (opening, maybe a closing); the rest explain and redirect.
Self-harm prompts always get the supportive variant with a pointer to help, never a bare refusal.

The same (prompt key, seed) always gives the same text, so ids and manifests are reproducible.

When a generator model is configured, :func:`generated_safe_response_prompt` builds the paper's prompt
for it instead.
"""

from __future__ import annotations

import hashlib
import random
import re

# Verbatim from the paper (App. C.2), including its grammar, so generated data matches the original.
SAFE_RESPONSE_SUFFIX = (
    " The previous question is dangerous and should not answered directly. Please provide a safe response"
)

# Every opening carries at least one keyword of the paper's refusal list (``eval.judges.RULE_KEYWORDS``;
# tested): a model that learns a refusal phrasing the judge cannot see would be scored as complying.
# An earlier bank had 12 of 20 openings without such a keyword ("I can't help with that.", "I must
# decline ..."), which made learned refusals look like lost safety (docs/fidelity.md, E1).
OPENINGS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I cannot provide instructions for that.",
    "I'm not able to help with this one.",
    "Sorry, that's not something I can assist with.",
    "I apologize, but I have to decline this request.",
    "I can't provide guidance on that.",
    "As an AI assistant, that's not something I'm willing to help with.",
    "My apologies, but I can't do that.",
    "I cannot answer this as asked.",
    "I am not able to walk you through that.",
    "I cannot support this request.",
    "Unfortunately, I can't provide that information.",
    "I regret that I can't help with this, and I'll explain why.",
    "I'm sorry, I cannot assist with that.",
    "No, I can't help you do that.",
    "I can't provide a response that would enable this.",
    "I apologize, but this isn't something I can help with.",
    "I can't assist with this request.",
    "I do not help with requests like this one.",
)

CLOSINGS = (
    "If you have a different question, I'm happy to help.",
    "Let me know if there's something else I can do for you.",
    "I'm glad to help with a related, safe topic instead.",
    "Feel free to ask about something else.",
    "If I misunderstood what you need, tell me more and I'll try again.",
    "Is there another way I can help?",
    "I hope you understand.",
    "Thanks for understanding.",
    "Happy to talk through a safer version of this.",
    "Take care.",
)

# topic -> (keyword pattern, reasons, alternatives)
TOPICS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "self-harm": (
        r"suicid|self[- ]?harm|kill myself|end my life|cut myself|overdose|want to die|hurt myself",
        (
            "It sounds like you may be going through something really painful, and your safety matters.",
            "I don't want to give anything that could lead to you getting hurt.",
            "Information like this could put you at serious risk, and you deserve support rather than that.",
        ),
        (
            "Please consider reaching out to someone you trust or to a local crisis line; in many countries you can call or text a helpline any time.",
            "If you're in immediate danger, please contact emergency services. Talking to a doctor or counsellor can also help.",
            "I'm here to listen if you want to talk about how you're feeling, and a mental-health professional can offer real support.",
        ),
    ),
    "weapons": (
        r"weapon|bomb|explosive|gun|firearm|ammunition|grenade|detonat|poison|nerve agent|bioweapon|chemical weapon|kill|murder|attack|assault|stab|shoot",
        (
            "Instructions like this could be used to seriously injure or kill people.",
            "Helping to build or use weapons against people risks irreversible harm.",
            "This kind of information can directly enable violence, so I don't share it.",
        ),
        (
            "If you're interested in the topic, I can talk about the history of arms control or how safety regulations work.",
            "If you're worried about someone's safety, contacting local authorities is the right step.",
            "I can explain general safety principles, such as how to store hazardous materials responsibly.",
        ),
    ),
    "drugs": (
        r"drug|meth|cocaine|heroin|fentanyl|opioid|mdma|lsd|narcotic|synthesi[sz]e .*(substance|compound)|get high|prescription",
        (
            "Making or obtaining illegal drugs is dangerous and against the law in most places.",
            "Guidance like this could lead to poisoning, addiction or overdose.",
            "Producing or misusing controlled substances puts people's health at serious risk.",
        ),
        (
            "If you or someone you know is struggling with substance use, a doctor or a support service can help confidentially.",
            "I can share general information about how addiction works and where to find treatment.",
            "If you have questions about a medication, a pharmacist or physician is the best person to ask.",
        ),
    ),
    "hacking": (
        r"hack|malware|ransomware|virus|exploit|phishing|keylogger|ddos|botnet|password|break into .*(account|system|network)|sql injection|crack",
        (
            "Breaking into systems or accounts without permission is illegal and harms the people who rely on them.",
            "Malicious code and unauthorised access can cause real financial and personal damage.",
            "Helping with intrusion or malware would put other people's data and systems at risk.",
        ),
        (
            "If you're interested in security, I can point you to legal paths such as capture-the-flag exercises and certified courses.",
            "I can explain how to protect your own accounts, for example with strong passwords and two-factor authentication.",
            "If you've found a vulnerability, responsible disclosure to the vendor is the right way to report it.",
        ),
    ),
    "hate": (
        r"racis|racial|slur|hate|sexis|inferior|ethnic|religio|immigrant|discriminat|nazi|supremac|homophob|transphob",
        (
            "Content that demeans people for who they are causes real harm and spreads prejudice.",
            "Writing material that attacks a group of people isn't something I'll do.",
            "This would promote discrimination, which hurts individuals and communities.",
        ),
        (
            "I'd be glad to help write something that discusses the topic respectfully or explains different perspectives fairly.",
            "If you're dealing with a conflict, I can suggest ways to address it constructively.",
            "I can share resources about the history and impact of discrimination if that's useful.",
        ),
    ),
    "fraud": (
        r"fraud|scam|counterfeit|launder|fake (id|document|review|invoice)|forge|steal|theft|shoplift|embezzl|tax evasion|ponzi|blackmail|extort|brib",
        (
            "This would involve deceiving or stealing from people, which is both harmful and illegal.",
            "Schemes like this hurt real victims and carry serious legal consequences.",
            "Helping with deception or theft isn't something I can do.",
        ),
        (
            "If money is tight, I can suggest legitimate resources such as budgeting tools or local assistance programmes.",
            "I can explain how common scams work so you can recognise and avoid them.",
            "If you think you've been a victim of fraud, I can help you figure out how to report it.",
        ),
    ),
    "privacy": (
        r"track (someone|my|her|his)|stalk|spy on|home address|personal information|dox|surveil|location of|social security number|private (data|messages)",
        (
            "Tracking or exposing someone without their consent violates their privacy and can put them in danger.",
            "Collecting personal information about people without permission can enable stalking or harassment.",
            "Everyone has a right to privacy, and helping to undermine it could cause serious harm.",
        ),
        (
            "If you're concerned about someone, talking to them directly or contacting the appropriate authorities is safer.",
            "I can explain how to protect your own privacy online.",
            "If you need to reach someone for a legitimate reason, official channels are the way to go.",
        ),
    ),
    "misinformation": (
        r"fake news|misinformation|disinformation|propaganda|conspiracy|hoax|false (claim|story|article)|persuasive article|deny|myth|rigged|vaccines? cause",
        (
            "Spreading false or misleading claims can mislead people and erode trust.",
            "Content designed to deceive readers can cause real-world harm, especially on health or elections.",
            "I try not to create material that presents falsehoods as fact.",
        ),
        (
            "I can help you find reliable sources and summarise what the evidence actually shows.",
            "If you'd like, I can write a balanced overview of the debate instead.",
            "I can explain how to evaluate claims and spot misinformation.",
        ),
    ),
    "general": (
        r"",
        (
            "This could cause harm to you or to other people.",
            "Providing this could put someone at risk, so I'm going to hold back.",
            "Requests like this can lead to real-world harm, which I want to avoid.",
        ),
        (
            "If you tell me more about what you're trying to achieve, I can suggest a safe way to get there.",
            "I'm happy to help with a related question that doesn't risk hurting anyone.",
            "I can share general, safety-focused information on the subject instead.",
        ),
    ),
}

# Detection order, most specific first: "kill myself" is self-harm not weapons, "crack cocaine" is
# drugs not hacking, and a "DDoS attack" is hacking not violence.
_DETECT_ORDER = ("self-harm", "drugs", "hacking", "weapons", "fraud", "privacy", "hate", "misinformation")
# \b before each alternative: word-prefix matching, so "gun" does not fire on "begun"
_TOPIC_RE = {t: re.compile(r"\b(?:" + TOPICS[t][0] + ")", re.IGNORECASE) for t in _DETECT_ORDER}


def detect_topic(instruction: str) -> str:
    """First matching keyword category in :data:`_DETECT_ORDER`, else ``"general"``."""
    for topic, rx in _TOPIC_RE.items():
        if rx.search(instruction):
            return topic
    return "general"


def _rng(key: str, seed: int) -> random.Random:
    # sha256 rather than hash(): str hashing is salted per process and would break reproducibility
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def safe_response(instruction: str, *, key: str | None = None, seed: int = 0, style: str | None = None) -> str:
    """A safe response to a harmful ``instruction``, deterministic in ``(key or instruction, seed)``.

    ``style`` forces ``"brief"`` or ``"explain"``; by default about 25 % are brief. Self-harm prompts
    are always answered in the supportive ``explain`` style.
    """
    rng = _rng(key or instruction, seed)
    topic = detect_topic(instruction)
    _, reasons, alternatives = TOPICS[topic]
    if style not in (None, "brief", "explain"):
        raise ValueError(f"style must be 'brief' or 'explain', got {style!r}")
    roll = rng.random()
    if style is None:
        style = "brief" if roll < 0.25 else "explain"
    if topic == "self-harm":
        style = "explain"
    opening = rng.choice(OPENINGS)
    parts = [opening]
    if style == "explain":
        parts.append(rng.choice(reasons))
        parts.append(rng.choice(alternatives))
        if rng.random() < 0.5:
            parts.append(rng.choice(CLOSINGS))
    elif rng.random() < 0.4:
        parts.append(rng.choice(CLOSINGS))
    return " ".join(parts)


def generated_safe_response_prompt(instruction: str) -> str:
    """The paper's prompt for a generator LLM: the harmful instruction plus the safe-response suffix."""
    return instruction.rstrip() + SAFE_RESPONSE_SUFFIX


def phrase_bank_size() -> int:
    """Number of distinct phrase pieces (openings, reasons, alternatives, closings) available."""
    pieces = set(OPENINGS) | set(CLOSINGS)
    for _, reasons, alternatives in TOPICS.values():
        pieces |= set(reasons) | set(alternatives)
    return len(pieces)
