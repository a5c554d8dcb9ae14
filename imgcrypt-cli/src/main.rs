fn main() {
    println!("imgcrypt: work in progress");
}
