//! Message encryption for Web Push (RFC 8291) with the `aes128gcm` content
//! coding (RFC 8188), as an application server does it.
//!
//! A push message is encrypted to the user agent's `p256dh` key and `auth`
//! secret from its `PushSubscription`. Each message uses a fresh ephemeral
//! P-256 key and a random salt, so two encryptions of the same text differ.
//!
//! The code lives in [`herald_proto::crypto`], shared with the user-agent side
//! (`herald listen`) that decrypts, so the key derivation exists once.

pub use herald_proto::crypto::{
    encrypt_aes128gcm, encrypt_with, EncryptError, DEFAULT_RECORD_SIZE, HEADER_LEN,
    MAX_PORTABLE_PLAINTEXT,
};

#[cfg(test)]
mod tests {
    use super::*;
    use herald_proto::crypto::TAG_LEN;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::SecretKey;
    use rand::rngs::OsRng;
    use rand::RngCore;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    struct Ua {
        private: Vec<u8>,
        public: Vec<u8>,
        auth: [u8; 16],
    }

    fn user_agent() -> Ua {
        let key = SecretKey::random(&mut OsRng);
        let mut auth = [0u8; 16];
        OsRng.fill_bytes(&mut auth);
        Ua {
            private: key.to_bytes().to_vec(),
            public: key.public_key().to_encoded_point(false).as_bytes().to_vec(),
            auth,
        }
    }

    fn ece_decrypt(ua: &Ua, body: &[u8]) -> Vec<u8> {
        let components = ece::EcKeyComponents::new(ua.private.clone(), ua.public.clone());
        ece::decrypt(&components, &ua.auth, body).expect("ece decrypts our body")
    }

    /// The worked example of RFC 8291 §5, byte for byte.
    #[test]
    fn matches_rfc8291_example() {
        let as_private = hex("c9f58f89813e9f8e872e71f42aa64e1757c9254dcc62b72ddc010bb4043ea11c");
        let ua_public = hex("042571b2becdfde360551aaf1ed0f4cd366c11cebe555f89bcb7b186a53339173168ece2ebe018597bd30479b86e3c8f8eced577ca59187e9246990db682008b0e");
        let auth = hex("05305932a1c7eabe13b6cec9fda48882");
        let salt: [u8; 16] = hex("0c6bfaadad67958803092d454676f397").try_into().unwrap();
        let ephemeral = SecretKey::from_slice(&as_private).unwrap();
        let body = encrypt_with(
            &ua_public,
            &auth,
            b"When I grow up, I want to be a watermelon",
            &ephemeral,
            &salt,
        )
        .unwrap();
        let expected = hex("0c6bfaadad67958803092d454676f397000010004104fe33f4ab0dea71914db55823f73b54948f41306d920732dbb9a59a53286482200e597a7b7bc260ba1c227998580992e93973002f3012a28ae8f06bbb78e5ec0ff297de5b429bba7153d3a4ae0caa091fd425f3b4b5414add8ab37a19c1bbb05cf5cb5b2a2e0562d558635641ec52812c6c8ff42e95ccb86be7cd");
        assert_eq!(body, expected);
    }

    #[test]
    fn ece_crate_decrypts_random_messages() {
        let ua = user_agent();
        for text in [&b""[..], b"x", b"hello, herald", &[0xffu8; 3993][..]] {
            let body = encrypt_aes128gcm(&ua.public, &ua.auth, text).unwrap();
            assert_eq!(body.len(), HEADER_LEN + text.len() + 1 + TAG_LEN);
            assert_eq!(&body[16..20], &4096u32.to_be_bytes());
            assert_eq!(body[20], 65);
            assert_eq!(ece_decrypt(&ua, &body), text);
        }
    }

    #[test]
    fn fresh_salt_and_key_every_time() {
        let ua = user_agent();
        let a = encrypt_aes128gcm(&ua.public, &ua.auth, b"same").unwrap();
        let b = encrypt_aes128gcm(&ua.public, &ua.auth, b"same").unwrap();
        assert_ne!(a[..16], b[..16], "salt reused");
        assert_ne!(a[21..86], b[21..86], "ephemeral key reused");
    }

    #[test]
    fn long_payload_grows_the_single_record() {
        let ua = user_agent();
        let text = vec![b'a'; 5000];
        let body = encrypt_aes128gcm(&ua.public, &ua.auth, &text).unwrap();
        assert_eq!(&body[16..20], &(5000u32 + 17).to_be_bytes());
        assert_eq!(ece_decrypt(&ua, &body), text);
    }

    #[test]
    fn wrong_auth_secret_does_not_decrypt() {
        let ua = user_agent();
        let body = encrypt_aes128gcm(&ua.public, &ua.auth, b"secret").unwrap();
        let mut other = Ua {
            auth: ua.auth,
            ..user_agent()
        };
        other.private.clone_from(&ua.private);
        other.public.clone_from(&ua.public);
        other.auth[0] ^= 1;
        let components = ece::EcKeyComponents::new(other.private, other.public);
        assert!(ece::decrypt(&components, &other.auth, &body).is_err());
    }

    #[test]
    fn rejects_malformed_subscription_keys() {
        let ua = user_agent();
        assert!(matches!(
            encrypt_aes128gcm(&ua.public[..33], &ua.auth, b"x"),
            Err(EncryptError::BadP256dh(_))
        ));
        let mut off_curve = ua.public.clone();
        off_curve[64] ^= 1;
        assert!(matches!(
            encrypt_aes128gcm(&off_curve, &ua.auth, b"x"),
            Err(EncryptError::BadP256dh(_))
        ));
        assert_eq!(
            encrypt_aes128gcm(&ua.public, &ua.auth[..12], b"x"),
            Err(EncryptError::BadAuth(12))
        );
    }
}
