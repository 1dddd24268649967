//! stub
pub mod orders;
pub mod events {
    //! stub
    /// stub
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct OrderPaid {
        /// a
        pub order_no: String,
        /// b
        pub user_id: String,
        /// c
        pub amount_cents: i64,
    }
}
pub mod stream {
    //! stub
    /// stub
    pub trait EventStream: Send + Sync {
        /// stub
        fn append(
            &self,
            payload: &str,
        ) -> impl std::future::Future<Output = Result<String, std::io::Error>> + Send;
    }
}
