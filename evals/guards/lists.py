"""Curated lists the evaluation set is generated from (written for this project)."""

FIRST = {
    "english": ["James", "Olivia", "Harold", "Margaret", "Ethan", "Chloe", "Graham", "Beatrice", "Nathan", "Eleanor"],
    "hispanic": ["Alejandro", "Lucía", "Mateo", "Valentina", "Santiago", "Ximena", "Joaquín", "Camila", "Diego",
                 "Renata"],
    "german": ["Matthias", "Annika", "Jürgen", "Friederike", "Lukas", "Hannelore", "Tobias", "Ingrid"],
    "french": ["Étienne", "Amélie", "Benoît", "Margaux", "Théo", "Clémence", "Gaspard", "Solène"],
    "italian": ["Giuseppe", "Chiara", "Lorenzo", "Francesca", "Matteo", "Giulia", "Alessandro", "Serena"],
    "indian": ["Priya", "Arjun", "Ananya", "Rohan", "Kavya", "Vikram", "Meera", "Siddharth", "Lakshmi", "Aditya"],
    "chinese": ["Wei", "Xiaoming", "Mei", "Jun", "Lihua", "Zhiwei", "Yan", "Hao"],
    "japanese": ["Haruto", "Yui", "Sota", "Aoi", "Ren", "Sakura", "Kenji", "Yuki"],
    "arabic": ["Omar", "Fatima", "Youssef", "Layla", "Khalid", "Amira", "Tariq", "Nour"],
    "african": ["Chinedu", "Ngozi", "Kwame", "Amara", "Oluwaseun", "Wanjiru", "Tendai", "Thandiwe", "Kofi"],
    "slavic": ["Dmitri", "Katarzyna", "Bogdan", "Svetlana", "Miroslav", "Zuzana", "Pavel", "Oksana"],
    "nordic": ["Sigrid", "Björn", "Astrid", "Henrik", "Freja", "Magnus", "Ingeborg", "Leif"],
    "korean": ["Minjun", "Seoyeon", "Jihoon", "Hayoon", "Dohyun", "Jiwoo"],
    "vietnamese": ["Nguyen", "Linh", "Minh", "Thao", "Quang", "Huong"],
    "word_names": ["Rose", "Grace", "Hope", "Faith", "Will", "Bill", "Mark", "Amber", "Jack", "Sunny", "Joy",
                   "Summer", "Violet", "Hunter", "Ivy", "Dawn", "Rusty", "Lily"],
}
LAST = {
    "english": ["Whitaker", "Pemberton", "Caldwell", "Hargreaves", "Fairbanks", "Thornton", "Ashworth", "Langley"],
    "hispanic": ["García", "Fernández", "Rodríguez", "Morales", "Castillo", "Gutiérrez", "Navarro", "Herrera"],
    "german": ["Schneider", "Hoffmann", "Krüger", "Wagner", "Schäfer", "Becker", "Zimmermann"],
    "french": ["Lefebvre", "Moreau", "Dubois", "Girard", "Fontaine", "Rousseau", "Chevalier"],
    "italian": ["Esposito", "Ricci", "Marino", "Bianchi", "Colombo", "Romano", "Ferrari"],
    "indian": ["Sharma", "Iyer", "Patel", "Reddy", "Chatterjee", "Nair", "Deshpande", "Malhotra"],
    "chinese": ["Zhang", "Wang", "Chen", "Liu", "Huang", "Zhou"],
    "japanese": ["Takahashi", "Watanabe", "Yamamoto", "Nakamura", "Kobayashi", "Matsumoto"],
    "arabic": ["Haddad", "Al-Farsi", "Mansour", "Khalil", "Nasser", "El-Amin"],
    "african": ["Okafor", "Mensah", "Adeyemi", "Mwangi", "Ndlovu", "Boateng", "Okonkwo"],
    "slavic": ["Kowalski", "Novak", "Ivanov", "Dvořák", "Petrenko", "Horvat"],
    "nordic": ["Lindqvist", "Johansson", "Haugen", "Nieminen", "Sørensen", "Bergström"],
    "korean": ["Kim", "Park", "Choi", "Jung", "Kang"],
    "vietnamese": ["Tran", "Pham", "Le", "Vo", "Dang"],
    "word_names": ["Baker", "Cook", "Young", "King", "Brown", "Hill", "Fox", "Wood", "Rich", "Black", "Stone",
                   "Moody", "Fisher", "Church"],
}
NON_LATIN_NAMES = ["王伟", "李娜", "Иван Петров", "Анна Смирнова", "محمد العلي", "佐藤 花子", "김민수",
                   "Γιώργος Παπαδόπουλος"]
MAIL_DOMAINS = ["gmail.com", "outlook.com", "yahoo.co.uk", "web.de", "orange.fr", "proton.me", "icloud.com",
                "mailbox.org", "hotmail.es", "libero.it", "rediffmail.com", "qq.com", "naver.com", "gmx.at"]
CARD_PREFIXES = {"visa": ["4"], "mastercard": ["51", "53", "55", "2221", "2720"], "amex": ["34", "37"],
                 "discover": ["6011", "65"], "jcb": ["3528", "3589"], "diners": ["36", "38"], "unionpay": ["62"],
                 "maestro": ["6759", "5018"]}
CARD_LENGTHS = {"amex": 15, "diners": 14}
IBAN_FORMATS = {"DE": 18, "GB": 18, "FR": 23, "ES": 20, "IT": 23, "NL": 14, "BE": 12, "CH": 17, "AT": 16,
                "PL": 24, "SE": 20, "IE": 18}
PHONES = [  # (format with # for digits, country)
    ("+1 (###) ###-####", "US"), ("(###) ###-####", "US"), ("+1 ###-###-####", "CA"), ("+44 20 #### ####", "GB"),
    ("+44 7### ######", "GB"), ("+49 30 ########", "DE"), ("+49 1## #######", "DE"), ("+33 6 ## ## ## ##", "FR"),
    ("+33 1 ## ## ## ##", "FR"), ("+34 6## ### ###", "ES"), ("+39 3## ### ####", "IT"), ("+91 98### #####", "IN"),
    ("+91-98###-#####", "IN"), ("+81 90-####-####", "JP"), ("+55 11 9####-####", "BR"), ("+61 4## ### ###", "AU"),
    ("+31 6 ########", "NL"), ("+27 82 ### ####", "ZA"), ("+234 803 ### ####", "NG"), ("+254 7## ######", "KE"),
    ("+46 70 ### ## ##", "SE"), ("+48 5## ### ###", "PL"), ("+52 55 #### ####", "MX"), ("+65 9### ####", "SG"),
]
STREETS = [  # (template, country); {n} a house number
    ("{n} Maple Street, Springfield, IL 62704", "US"), ("{n} Oak Avenue, Portland, OR 97205", "US"),
    ("{n} Sunset Boulevard, Los Angeles, CA 90028", "US"), ("{n} Willow Lane, Austin, TX 78701", "US"),
    ("{n} Harbour Road, Brighton BN1 3EU", "GB"), ("{n} Kings Road, London SW3 4UX", "GB"),
    ("{n} Queen Street, Toronto, ON", "CA"), ("{n} George Street, Sydney NSW 2000", "AU"),
    ("Lindenstraße {n}, 10969 Berlin", "DE"), ("Goethestraße {n}, 80336 München", "DE"),
    ("Mozartgasse {n}, 1040 Wien", "AT"), ("{n} rue des Lilas, 75019 Paris", "FR"),
    ("{n} avenue Jean Jaurès, 69007 Lyon", "FR"), ("Calle de Alcalá {n}, 28014 Madrid", "ES"),
    ("Via Garibaldi {n}, 10122 Torino", "IT"), ("Prinsengracht {n}, 1015 DV Amsterdam", "NL"),
    ("Rua Augusta {n}, 1100-053 Lisboa", "PT"), ("Bahnhofstrasse {n}, 8001 Zürich", "CH"),
    ("{n} Park Drive, Dublin", "IE"), ("Storgatan {n}, 111 23 Stockholm", "SE"),
]
COMPANY_ADDRESSES = [
    "Apple Inc., One Apple Park Way, Cupertino, CA 95014",
    "Google's headquarters are at 1600 Amphitheatre Parkway, Mountain View, CA 94043",
    "Microsoft Corporation, One Microsoft Way, Redmond, WA 98052",
    "the Amazon HQ at 410 Terry Avenue North, Seattle, WA 98109",
    "Siemens AG headquarters, Werner-von-Siemens-Straße 1, 80333 München",
    "the Louvre Museum, Rue de Rivoli, 75001 Paris",
    "our office at 350 Fifth Avenue, New York, NY 10118 (Empire State Building)",
    "the company store, 1 Infinite Loop, Cupertino",
]
URL_SITES = ["linkedin.com/in/", "github.com/", "twitter.com/", "instagram.com/", "x.com/", "medium.com/@",
             "gitlab.com/"]
PUBLIC_URLS = ["https://docs.python.org/3/library/re.html", "https://github.com/openai/openai-python",
               "https://www.w3.org/TR/html52/", "https://en.wikipedia.org/wiki/Luhn_algorithm",
               "https://pypi.org/project/presidio-analyzer/", "https://example.com/docs/getting-started"]
