//! (image, caption) training pairs for pre-training the base model, with a controlled
//! fraction of wrong captions.
//!
//! With probability `wrong_fraction` the image is rendered from a perturbed spec (or degraded)
//! while the caption stays the original prompt, so a model trained on the pairs follows
//! prompts only partly, as SD3.5-M does before RL. Perturbations by task:
//! - composition: a wrong colour, a wrong exact count, a missing object, or the converse
//!   relation;
//! - text: one character substituted, deleted or inserted;
//! - preference: the temperature or brightness flipped, or an unaesthetic layout (subject off
//!   centre on a noisy or high-contrast background);
//! - quality: a [`Degradation`] (blur, noise or smear) of the ground-truth image.

use rand::RngCore;

use crate::world::degrade::Degradation;
use crate::world::font::{ALPHABET, MAX_TEXT_LEN};
use crate::world::image::{IMAGE_SIZE, Image32};
use crate::world::palette::{BackgroundTone, Colour};
use crate::world::prompts::{Prompt, sample_any_prompt};
use crate::world::random::{below, chance, int_in, pick};
use crate::world::render::{Background, GradientDirection, Layout, layout_with, noisy_background, render_with};
use crate::world::spec::{CompositionSpec, Link, ObjectSpec, PreferenceSpec, Spec, TextSpec};

/// How a training pair's image departs from its caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perturbation {
    /// A named colour is drawn as another colour.
    WrongColour,
    /// An exact count is drawn as another count (1 to 4).
    WrongCount,
    /// One object phrase is left out of the image.
    MissingObject,
    /// The relation is drawn reversed.
    WrongRelation,
    /// One character of the text is substituted, deleted or inserted.
    WrongText,
    /// The palette temperature or the brightness is the opposite one.
    StyleFlip,
    /// The subject is off centre on a busy background.
    Unaesthetic,
    /// The ground-truth image is degraded.
    Degraded(Degradation),
}

/// An image with its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPair {
    /// The image.
    pub image: Image32,
    /// The caption (always a prompt of the grammar).
    pub caption: String,
    /// How the image departs from the caption, if it does.
    pub perturbation: Option<Perturbation>,
}

/// A training pair for `prompt` drawn in `style`: a ground-truth render, or with probability
/// `wrong_fraction` a perturbed one (see the module docs).
pub fn training_pair<R: RngCore + ?Sized>(prompt: &Prompt, wrong_fraction: f32, style: Layout, rng: &mut R) -> TrainingPair {
    let caption = prompt.text.clone();
    if !chance(rng, wrong_fraction) {
        return TrainingPair { image: render_with(&prompt.spec, style, rng), caption, perturbation: None };
    }
    let (image, perturbation) = match &prompt.spec {
        Spec::Composition(c) => perturb_composition(c, style, rng),
        Spec::Text(t) => (render_with(&Spec::Text(wrong_text(t, rng)), style, rng), Perturbation::WrongText),
        Spec::Preference(p) => perturb_preference(p, style, rng),
        Spec::Quality(_) => {
            let degradation = *pick(rng, &Degradation::ALL);
            let clean = render_with(&prompt.spec, style, rng);
            (degradation.apply(&clean, rng), Perturbation::Degraded(degradation))
        }
    };
    TrainingPair { image, caption, perturbation: Some(perturbation) }
}

/// A training pair for a prompt of a uniformly chosen task.
pub fn sample_training_pair<R: RngCore + ?Sized>(wrong_fraction: f32, style: Layout, rng: &mut R) -> TrainingPair {
    let prompt = sample_any_prompt(rng);
    training_pair(&prompt, wrong_fraction, style, rng)
}

fn perturb_composition<R: RngCore + ?Sized>(c: &CompositionSpec, style: Layout, rng: &mut R) -> (Image32, Perturbation) {
    let mut options = vec![Perturbation::MissingObject];
    if c.objects().iter().any(|o| o.colour.is_some()) {
        options.push(Perturbation::WrongColour);
    }
    if c.objects().iter().any(|o| o.number.is_some()) {
        options.push(Perturbation::WrongCount);
    }
    if c.relation().is_some() {
        options.push(Perturbation::WrongRelation);
    }
    let choice = *pick(rng, &options);
    let mut spec = c.clone();
    // a random object phrase among those `applies` holds for
    let chosen = |applies: fn(&ObjectSpec) -> bool, rng: &mut R| {
        let indices: Vec<usize> = c.objects().iter().enumerate().filter(|(_, o)| applies(o)).map(|(i, _)| i).collect();
        *pick(rng, &indices)
    };
    match choice {
        Perturbation::WrongColour => {
            let object = object_mut(&mut spec, chosen(|o| o.colour.is_some(), rng));
            let others: Vec<Colour> = Colour::ALL.into_iter().filter(|&k| Some(k) != object.colour).collect();
            object.colour = Some(*pick(rng, &others));
        }
        Perturbation::WrongCount => {
            let object = object_mut(&mut spec, chosen(|o| o.number.is_some(), rng));
            let shift = int_in(rng, 1, 3) as u8;
            object.number = object.number.map(|n| (n - 1 + shift) % 4 + 1);
        }
        Perturbation::WrongRelation => {
            if let Some((Link::Relation(r), second)) = spec.second {
                spec.second = Some((Link::Relation(r.converse()), second));
            }
        }
        _ => {
            // a missing object: drop one of two phrases, or draw no object at all
            let Some((_, second)) = spec.second.take() else {
                let mut scene = layout_with(&Spec::Composition(spec), style, rng);
                scene.objects.clear();
                return (scene.draw(), Perturbation::MissingObject);
            };
            if chance(rng, 0.5) {
                spec.first = second;
            }
        }
    }
    (render_with(&Spec::Composition(spec), style, rng), choice)
}

fn object_mut(spec: &mut CompositionSpec, index: usize) -> &mut ObjectSpec {
    match (index, spec.second.as_mut()) {
        (0, _) | (_, None) => &mut spec.first,
        (_, Some((_, second))) => second,
    }
}

fn wrong_text<R: RngCore + ?Sized>(t: &TextSpec, rng: &mut R) -> TextSpec {
    let alphabet: Vec<char> = ALPHABET.chars().collect();
    let mut chars: Vec<char> = t.text.chars().collect();
    let len = chars.len();
    let op = loop {
        let op = below(rng, 3);
        if (op == 1 && len <= 1) || (op == 2 && len >= MAX_TEXT_LEN) {
            continue;
        }
        break op;
    };
    match op {
        0 => {
            let i = below(rng, len);
            let others: Vec<char> = alphabet.iter().copied().filter(|&c| c != chars[i]).collect();
            chars[i] = *pick(rng, &others);
        }
        1 => {
            chars.remove(below(rng, len));
        }
        _ => {
            let at = below(rng, len + 1);
            chars.insert(at, *pick(rng, &alphabet));
        }
    }
    TextSpec { template: t.template, text: chars.into_iter().collect() }
}

fn perturb_preference<R: RngCore + ?Sized>(p: &PreferenceSpec, style: Layout, rng: &mut R) -> (Image32, Perturbation) {
    let can_flip = p.style.warmth.is_some() || p.style.lighting.is_some();
    if can_flip && chance(rng, 0.5) {
        let mut flipped = p.clone();
        match (p.style.warmth, p.style.lighting) {
            (Some(w), Some(_)) if chance(rng, 0.5) => flipped.style.warmth = Some(w.flipped()),
            (Some(w), None) => flipped.style.warmth = Some(w.flipped()),
            (_, l) => flipped.style.lighting = l.map(|l| l.flipped()),
        }
        return (render_with(&Spec::Preference(flipped), style, rng), Perturbation::StyleFlip);
    }
    let mut scene = layout_with(&Spec::Preference(p.clone()), style, rng);
    // a lone subject moves off centre, into a corner region (several subjects are already
    // scattered by the layout)
    if let [object] = scene.objects.as_mut_slice() {
        let span = (IMAGE_SIZE - 1 - object.size) as i32;
        let corner =
            |rng: &mut R| if chance(rng, 0.5) { int_in(rng, 1, span / 3) } else { int_in(rng, 2 * span / 3, span) };
        object.x = corner(rng) as usize;
        object.y = corner(rng) as usize;
    }
    scene.background = if chance(rng, 0.5) {
        noisy_background(BackgroundTone::ANY, rng)
    } else {
        let (from, to) = (BackgroundTone::PALE.sample(rng), BackgroundTone::DARK.sample(rng));
        Background::Gradient { from, to, direction: GradientDirection::Diagonal }
    };
    (scene.draw(), Perturbation::Unaesthetic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::grammar::parse;
    use crate::world::read::read_text;
    use crate::world::spec::Task;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashSet;

    #[test]
    fn wrong_fraction_controls_how_many_pairs_are_perturbed() {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        for (fraction, style) in [(0.0, Layout::Scattered), (0.3, Layout::Scattered), (0.3, Layout::Canonical), (1.0, Layout::Canonical)] {
            let wrong =
                (0..2_000).filter(|_| sample_training_pair(fraction, style, &mut rng).perturbation.is_some()).count();
            let expected = fraction * 2_000.0;
            assert!((wrong as f32 - expected).abs() <= 70.0, "fraction {fraction}: {wrong} wrong pairs");
        }
    }

    #[test]
    fn every_perturbation_kind_occurs_and_captions_stay_in_the_grammar() {
        for style in [Layout::Scattered, Layout::Canonical] {
            let mut rng = ChaCha8Rng::seed_from_u64(32);
            let mut kinds = HashSet::new();
            for _ in 0..3_000 {
                let pair = sample_training_pair(1.0, style, &mut rng);
                parse(&pair.caption).unwrap();
                kinds.insert(pair.perturbation.unwrap());
            }
            assert_eq!(kinds.len(), 10, "{style:?}: {kinds:?}");
        }
    }

    #[test]
    fn wrong_text_images_do_not_say_the_caption() {
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        for i in 0..300 {
            let style = if i % 2 == 0 { Layout::Scattered } else { Layout::Canonical };
            let prompt = crate::world::prompts::sample_prompt(Task::Text, &mut rng);
            let pair = training_pair(&prompt, 1.0, style, &mut rng);
            let Spec::Text(t) = &prompt.spec else { unreachable!() };
            let read = read_text(&pair.image);
            assert_ne!(read, t.text);
            assert!((1..=MAX_TEXT_LEN).contains(&read.len()), "{read:?}");
        }
    }
}
