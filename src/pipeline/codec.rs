//! Latent codecs: what turns images into the latents the MMDiT denoises and back. The SD3 VAE
//! is one; the synthetic world uses an exact pixel-unshuffle codec with the same interface.

use burn::tensor::Tensor;
use crate::Backend;

/// Images `[B, 3, H, W]` in `[0, 1]` <-> latents `[B, C, h, w]`.
pub trait LatentCodec<B: Backend> {
    /// Latent channels.
    fn latent_channels(&self) -> usize;
    /// Latent `[h, w]` for an image of `[height, width]`.
    fn latent_size(&self, height: usize, width: usize) -> [usize; 2];
    /// Images in `[0, 1]` to latents (already scaled to roughly unit variance).
    fn encode(&self, images: Tensor<B, 4>) -> Tensor<B, 4>;
    /// Latents to images, clamped to `[0, 1]`.
    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4>;
}

/// The synthetic world's exact codec: pixel unshuffle by `factor` (`[B, 3, 32, 32]` ->
/// `[B, 12, 16, 16]` for factor 2) with pixels mapped from `[0, 1]` to `[-1, 1]`. Lossless:
/// `decode(encode(x)) == x`. Channel `c * f^2 + i * f + j` holds colour `c` at offset `(i, j)`
/// of each `f x f` cell (PyTorch's `pixel_unshuffle` order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PixelUnshuffle {
    pub factor: usize,
}

impl Default for PixelUnshuffle {
    fn default() -> Self {
        Self { factor: 2 }
    }
}

impl<B: Backend> LatentCodec<B> for PixelUnshuffle {
    fn latent_channels(&self) -> usize {
        3 * self.factor * self.factor
    }

    fn latent_size(&self, height: usize, width: usize) -> [usize; 2] {
        [height / self.factor, width / self.factor]
    }

    fn encode(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = images.dims();
        let f = self.factor;
        assert!(h % f == 0 && w % f == 0, "image {h} x {w} is not divisible by the codec factor {f}");
        (images * 2.0 - 1.0)
            .reshape([b, c, h / f, f, w / f, f])
            .permute([0, 1, 3, 5, 2, 4])
            .reshape([b, c * f * f, h / f, w / f])
    }

    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, cf, h, w] = latents.dims();
        let f = self.factor;
        let c = cf / (f * f);
        let pixels = latents
            .reshape([b, c, f, f, h, w])
            .permute([0, 1, 4, 2, 5, 3])
            .reshape([b, c, h * f, w * f]);
        ((pixels + 1.0) * 0.5).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn pixel_unshuffle_is_exact_and_in_pytorch_order() {
        let device = Default::default();
        let values: Vec<f32> = (0..2 * 3 * 4 * 6).map(|i| (i % 17) as f32 / 16.0).collect();
        let images = Tensor::<Flex, 4>::from_data(TensorData::new(values.clone(), [2, 3, 4, 6]), &device);
        let codec = PixelUnshuffle::default();
        let latents = LatentCodec::<Flex>::encode(&codec, images);
        assert_eq!(latents.dims(), [2, 12, 2, 3]);
        let l = latents.clone().into_data().into_vec::<f32>().unwrap();
        // latent[b, c*4 + i*2 + j, y, x] = 2 * image[b, c, 2y + i, 2x + j] - 1
        for (b, c, i, j, y, x) in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 0, 1, 2), (0, 1, 1, 1, 0, 1)] {
            let img = values[((b * 3 + c) * 4 + 2 * y + i) * 6 + 2 * x + j];
            let lat = l[((b * 12 + c * 4 + i * 2 + j) * 2 + y) * 3 + x];
            assert_eq!(lat, 2.0 * img - 1.0);
        }
        let back = LatentCodec::<Flex>::decode(&codec, latents).into_data().into_vec::<f32>().unwrap();
        assert_eq!(back, values);
    }
}
