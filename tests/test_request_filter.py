"""The request filter shared by synth-inputs and rl-prompts, on realistic teacher lines."""

from __future__ import annotations

import pytest

from engine.llm.parsing import RequestFilter, candidate_lines, request_problem

DEMOS = [
    "Email Prof. Anita Raman, my advisor, with an update on the river-sediment project: the "
    "March 4 field samples came back contaminated, so the analysis slips to March 28.",
    "Write to Dr. Lee, my dentist, to move my cleaning to next week.",
]

REQUESTS = [
    "Email Sam Ortiz, the lab manager, to order two more pipette racks by Friday 5/2.",
    "Write to Prof. Kim to ask for a recommendation letter for the NSF fellowship due Oct 15.",
    "Reply to Jordan from the conference committee declining the invitation to chair a session on 6/12.",
    "Ask the department admin, Carla, whether the $412 reimbursement for the Denver trip went through.",
    "Tell my landlord, Mr. Patel, that the kitchen sink has been leaking since Monday and ask for a plumber.",
    "I need to let my co-author Wei know the revised figures will be two days late, now due Thu 11/6.",
    "Draft a note to the open-source maintainers of scikit-bio offering to fix the broken FASTA parser.",
]

NOT_REQUESTS = [
    "I am not a human and I am not a 550-word essay.",
    "I'm an AI language model, so I can't send emails, but here are some ideas.",
    "As an AI assistant, I will write the requests below.",
    "Here are 10 new requests on the topic of reimbursement:",
    "Sure! Here are some requests you could give the assistant.",
    "I hope these requests help you with your email-writing assistant!",
    "Let me know if you would like more examples of such requests.",
    "Reimbursement Requests",
    "### Job & Career Context",
    "REQUESTS ABOUT SOCIAL EVENTS AND GATHERINGS",
    "Requests:",
    "ok",
    "1234 5678 !!! ### ++",
    "email " * 200,
]


@pytest.mark.parametrize("line", REQUESTS)
def test_requests_pass(line):
    assert request_problem(line) is None


@pytest.mark.parametrize("line", NOT_REQUESTS)
def test_non_requests_filtered(line):
    assert request_problem(line.strip()) is not None


def test_counts_accepted_filtered_duplicates_separately():
    f = RequestFilter(DEMOS)
    reply = "\n".join(
        [
            "Here are 5 new requests:",
            f"1. {REQUESTS[0]}",
            f"2. {REQUESTS[0].lower()}",  # exact duplicate, case-insensitive
            f"3.   {REQUESTS[0].replace(' ', '  ')}",  # space-insensitive
            f"4. {REQUESTS[0].replace('5/2', '5/9')}",  # near duplicate
            "5. I am not a human and I am not a 550-word essay.",
            f"6. {DEMOS[1]}",  # a demonstration echoed back
            f"7. {DEMOS[0].replace('March 28', 'March 29')}",  # a near-copy of a demonstration
            f"8. {REQUESTS[2]}",
        ]
    )
    got = f.take(reply)
    assert got == [REQUESTS[0], REQUESTS[2]]
    assert f.accepted == 2
    assert f.duplicates == 3
    assert f.filtered == 4  # heading line, teacher talk, demo copy, demo near-copy
    assert f.reasons["copies a demonstration"] == 2
    assert f.candidates == 9
    assert "2 accepted" in f.summary()


def test_limit_and_json_reply():
    f = RequestFilter(DEMOS)
    reply = '```json\n["' + '", "'.join(REQUESTS[:4]) + '"]\n```'
    assert f.take(reply, limit=2) == REQUESTS[:2]
    assert f.accepted == 2 and f.candidates == 2
    assert len(candidate_lines(reply)) == 4
