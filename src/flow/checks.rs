//! Checks of sampling settings that come from the user (command-line flags, recipe fields):
//! each error names the flag or field (`field`) and the value refused, so bad input is refused
//! before any model is loaded instead of panicking or sampling garbage later.

/// A step count (ODE or SDE steps, iterations, batch sizes): at least 1.
pub fn at_least_one(field: &str, value: usize) -> Result<(), String> {
    if value == 0 {
        return Err(format!("{field}: must be at least 1, got 0"));
    }
    Ok(())
}

/// A classifier-free guidance scale: a finite number >= 0 (1 disables guidance).
pub fn guidance(field: &str, value: f64) -> Result<(), String> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{field}: the CFG scale must be a finite number >= 0, got {value}"));
    }
    Ok(())
}

/// The SDE noise level `a` of rollouts: in (0, 1].
pub fn noise_level(field: &str, value: f64) -> Result<(), String> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(format!("{field}: the SDE noise level must lie in (0, 1], got {value}"));
    }
    Ok(())
}

/// A fraction such as `timestep_fraction`: in (0, 1].
pub fn fraction(field: &str, value: f64) -> Result<(), String> {
    if !(value > 0.0 && value <= 1.0) {
        return Err(format!("{field}: must lie in (0, 1], got {value}"));
    }
    Ok(())
}

/// A probability such as a dropout rate or an EMA decay: in [0, 1].
pub fn probability(field: &str, value: f64) -> Result<(), String> {
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{field}: must lie in [0, 1], got {value}"));
    }
    Ok(())
}

/// A weight, learning rate or budget: a finite number >= 0.
pub fn non_negative(field: &str, value: f64) -> Result<(), String> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{field}: must be a finite number >= 0, got {value}"));
    }
    Ok(())
}

/// A value that must be finite and strictly positive (a schedule shift, a LoRA alpha).
pub fn positive(field: &str, value: f64) -> Result<(), String> {
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{field}: must be a finite number > 0, got {value}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_value() {
        assert_eq!(at_least_one("--steps", 0).unwrap_err(), "--steps: must be at least 1, got 0");
        assert!(at_least_one("--steps", 1).is_ok());
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let err = guidance("--cfg", bad).unwrap_err();
            assert!(err.starts_with("--cfg:") && err.ends_with(&bad.to_string()), "{err}");
        }
        assert!(guidance("--cfg", 0.0).is_ok() && guidance("--cfg", 4.5).is_ok());
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(noise_level("a", bad).unwrap_err().contains(&bad.to_string()));
        }
        assert!(noise_level("a", 1.0).is_ok() && noise_level("a", 0.7).is_ok());
        assert!(fraction("f", 0.0).is_err() && fraction("f", 1.0).is_ok());
        assert!(probability("p", 0.0).is_ok() && probability("p", 1.01).is_err() && probability("p", f64::NAN).is_err());
        assert!(non_negative("w", 0.0).is_ok() && non_negative("w", f64::NAN).is_err());
        assert!(positive("s", 0.0).is_err() && positive("s", 3.0).is_ok());
    }
}
