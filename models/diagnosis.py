"""Plain-language advice on a trained head, from d/m, the gap between training and validation
error, and what cross-validation already tried."""

from __future__ import annotations


def diagnose(d: int, m: int, train_accuracy: float, val_accuracy: float, validation_size: int,
             num_classes: int, *, candidates: int = 1, smaller_rejected: int = 0,
             views_rejected: bool = False) -> list[str]:
    """Advice on the chosen head, one sentence group per finding.

    Args:
        d: trainable parameters of the head; m: training examples (augmented views included).
        train_accuracy: the head on the images it was trained on; val_accuracy: out of fold.
        validation_size: images behind `val_accuracy`.
        num_classes: number of labels.
        candidates: heads cross-validated; 1 means the head was given in the options.
        smaller_rejected: how many smaller heads (fewer parameters or stronger L2) were
            cross-validated and had no lower mean validation loss than the chosen one (the
            selection's reason to prefer it; `Selection.smaller_rejected`). When there are any,
            the head is not "too big", and when the chosen head is the smallest tried there is
            no smaller one to suggest: either way advising a smaller head would contradict the
            selection.
        views_rejected: cross-validation compared heads trained on augmented views with the
            same heads on the originals only and served the latter (the probe check), so
            advising more augmentation would contradict it too. False where no views were
            tried (the preview stage, `augmentation.views` 0): more views stay worth trying.

    Returns:
        Notes in words; at least one.
    """
    notes = []
    fixed_head = candidates == 1
    smallest_tried = not fixed_head and not smaller_rejected
    smaller = ('a smaller head (head "auto" cross-validates linear heads over five orders of '
               "magnitude of L2)") if fixed_head else None
    augmenting = not views_rejected
    more = ("More images per label or more augmented views (augmentation.views) would help "
            "most." if augmenting else
            "More images per label would help most (on cross-validation the augmented views "
            "did not beat the head trained on the original images only by more than a "
            "standard error, so that head is served).")
    if d > m:
        if smallest_tried:
            notes.append(
                f"d/m = {d / m:.2f}: the head has more trainable parameters ({d}) than training "
                f"examples ({m}); it is already the smallest and most regularised of the "
                f"{candidates} heads cross-validation tried. {more}")
        elif smaller_rejected:
            notes.append(
                f"d/m = {d / m:.2f}: the head has more trainable parameters ({d}) than training "
                f"examples ({m}), but cross-validation tried {smaller_rejected} smaller or more "
                "regularised heads and none had a lower validation loss, so its L2 penalty, "
                f"not its size, is what keeps it from memorising. {more}")
        else:
            notes.append(
                f"d/m = {d / m:.2f}: the head has more trainable parameters ({d}) than training "
                f"examples ({m}), so it can memorise them. More images per label"
                + (", more augmented views (augmentation.views)" if augmenting else "")
                + f" or {smaller} would help.")
    train_error, val_error = 1 - train_accuracy, 1 - val_accuracy
    if val_error - train_error > 0.1 and val_error > 1.5 * train_error:
        advice = ("More images or stronger augmentation (augmentation.views, rotation, shift, "
                  "noise)" if augmenting else "More images")
        if smaller:
            advice += f", or {smaller},"
        notes.append(
            f"Validation error ({val_error:.0%}, out of fold) stays far above training error "
            f"({train_error:.0%}): the head overfits. {advice} would help.")
    if val_accuracy < 1.0 / num_classes + 0.1:
        notes.append(
            f"Validation accuracy ({val_accuracy:.0%}) is near chance for {num_classes} labels: "
            "check that the folders hold what their names say and that the classes can be told "
            "apart from the pictures; more images per label would help.")
    if validation_size < 10 * num_classes:
        notes.append(
            f"Only {validation_size} images were validated: the validation metrics are a rough "
            "estimate. More images per label would make them firmer.")
    if not notes:
        notes.append(f"d/m = {d / m:.2f} and validation error is close to training error: "
                     "no sign of overfitting.")
    return notes


def fine_tuning_notes(d_head: int, d_blocks: int, m: int, *, l2_sp: float, learning_rate: float,
                      relative_shift: dict[str, float], best_epoch: int, max_epochs: int) -> list[str]:
    """Why a fine-tuned classifier's d/m overstates its capacity.

    Args:
        d_head: the head's trainable parameters; d_blocks: the trained conv layers'.
        m: training examples (augmented views included).
        l2_sp, learning_rate: the tether α and Adam's step size of the kept run.
        relative_shift: per trained layer, ‖w − w⁰‖/‖w⁰‖ of the kept weights.
        best_epoch, max_epochs: where validation stopped the kept run, of how many allowed.

    Returns:
        Notes in words.
    """
    d = d_head + d_blocks
    largest = max(relative_shift, key=relative_shift.get)
    return [
        f"Fine-tuned: d = {d} counts the {d_blocks} conv parameters of the trained blocks as "
        f"well as the head's {d_head}, so d/m = {d / m:.0f}. They do not start from nothing and "
        f"do not go far: the L2-SP tether α/2·‖w − w⁰‖² (α = {l2_sp:g}) pulls them back to the "
        f"ImageNet weights w⁰, Adam's step size is small ({learning_rate:g}), and early "
        f"stopping on validation kept epoch {best_epoch} of at most {max_epochs}. The largest "
        f"relative move is {relative_shift[largest]:.2%} ({largest}): the trained blocks stay "
        "in a small ball around the pretrained hypothesis, so the effective hypothesis space "
        "is far smaller than d suggests, and validation, not d/m, decided that it pays."]
