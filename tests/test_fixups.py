from engine.llm.fixups import enforce_signoff, fix_output, trim_repetition


def test_preamble_offer_tokens_removed():
    text = (
        "Sure! Here's a draft of the email:\n\nHi Bob —\n\nThe review moves to Fri 3/7.\n\nThanks!\n— Maya\n\n"
        "If you want, I can make it more formal.<|im_end|>"
    )
    out, applied = fix_output(text)
    assert out == "Hi Bob —\n\nThe review moves to Fri 3/7.\n\nThanks!\n— Maya"
    assert {"chat_tokens", "preamble", "closing_offer"} <= set(applied)


def test_let_me_know_and_subject():
    out, _ = fix_output(
        "Subject: Moving our call\n\nHi Ana —\n\nCan we move it?\n\nLet me know if you'd like any changes!"
    )
    assert out == "Hi Ana —\n\nCan we move it?"


def test_clean_text_untouched():
    text = "Hi Ana —\n\nLet me know by Fri 3/7 whether the slot works.\n\nThanks!\n— Maya"
    out, applied = fix_output(text)
    assert applied == [] and out == text


def test_signoff_enforced():
    assert enforce_signoff("Hi —\n\nok", "— Maya").endswith("ok\n\n— Maya")
    assert enforce_signoff("Hi —\n\nok\n— Maya\nP.S. more", "— Maya") == "Hi —\n\nok\n— Maya"
    out, applied = fix_output("Hi —\n\nok", signoff="— Maya")
    assert out.endswith("— Maya") and "signoff" in applied


def test_repetition_trimmed():
    loop = "I will be there on time. " * 6
    assert trim_repetition("Hi Bob —\n" + loop).count("I will be there") == 1
    assert (
        trim_repetition("A long repeated line here\nA long repeated line here\nThanks!")
        == "A long repeated line here\nThanks!"
    )


def test_email_sentences_and_signoff_are_not_offers():
    email = (
        "Hi Dr. Lee,\n\nCould we move my cleaning to next week?\nLet me know if Tuesday works.\n\n"
        "If you need anything else from me, just ask.\nThanks,\nMaya"
    )
    assert fix_output(email) == (email, [])
    offer = email + "\n\nLet me know if you'd like me to make it shorter!"
    assert fix_output(offer) == (email, ["closing_offer"])
